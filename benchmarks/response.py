"""Response benchmark: the 8-week treatment-response pipeline (M5) on a baseline + follow-up pair.

One synthetic patient: a baseline CT + SEG with 3 liver lesions and an ~8-week follow-up in which
every lesion shrank and the body moved (a known shift), so that the rigid registration has work to
do. Each round runs, back to back on the same files:

- the response pipeline as the worker runs it (both studies loaded, lesions measured with
  pyradiomics, rigid registration of the follow-up onto the baseline, lesion matching, deltas, the
  DEMO response signature), with the registration's own time from its result;
- as the peer, the radiomics pipeline on the baseline and on the follow-up (the feature
  extraction of both time points without registration or matching).

Reported: median (min-max) of the rounds after one warm-up, the registration's share, and the
ratio response / peer per round. The phantom pair's registration must find the planted shift (the
benchmark stops with an error otherwise, so a fast wrong answer is never a result).

Usage:  .venv/bin/python benchmarks/response.py [--rounds 3] [--slices 120] [--size 512]
Writes: benchmarks/results/response.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from typing import Any

import numpy as np
from common import WORK_ROOT, fresh_dir, header, load_average, markdown_table, spread, write_results

from inference.phantom import generate_follow_up, generate_study
from inference.pipelines import PIPELINES
from inference.pipelines.model_methods import find_package
from inference.pipelines.response import run_response
from inference.response.signature import load_signature
from pacs_agent.config import DEMO_MODELS_DIR

WORK = WORK_ROOT / "response"
SHIFT_MM = (6.0, -8.0, 5.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--lesions", type=int, default=3)
    args = parser.parse_args()
    load_start = load_average()
    fresh_dir(WORK)
    print(f"generating a baseline + follow-up pair: {args.slices} slices {args.size}x{args.size} ...", flush=True)
    base = generate_study(
        WORK / "baseline", seed=41, lesions=args.lesions, slices=args.slices, rows=args.size, columns=args.size
    )
    follow = generate_follow_up(base, WORK / "follow-up", shrink=0.7, body_shift_mm=SHIFT_MM)
    assert base.seg_file is not None and follow.seg_file is not None
    package = find_package("response", [DEMO_MODELS_DIR])
    if package is None:
        sys.exit(f"no response package under {DEMO_MODELS_DIR}")
    signature = load_signature(package)

    def response() -> Any:
        return run_response(base.ct_files, base.seg_file, follow.ct_files, follow.seg_file, model=signature)

    def peer() -> None:
        PIPELINES["radiomics"](base.ct_files, base.seg_file)
        PIPELINES["radiomics"](follow.ct_files, follow.seg_file)

    response()  # warm-up (imports, pyradiomics set-up)
    peer()
    rounds: list[dict[str, Any]] = []
    for n in range(args.rounds):
        start = time.perf_counter()
        result = response()
        response_s = time.perf_counter() - start
        start = time.perf_counter()
        peer()
        peer_s = time.perf_counter() - start
        found = np.asarray(result.alignment.translation_mm)
        if np.abs(found - SHIFT_MM).max() > 1.5:
            raise RuntimeError(f"the registration found {found.round(2)} mm, not the planted shift {SHIFT_MM}")
        rounds.append(
            {
                "round": n + 1,
                "response_s": round(response_s, 3),
                "registration_s": round(result.alignment.seconds, 3),
                "peer_s": round(peer_s, 3),
                "ratio": round(response_s / peer_s, 2),
                "matched_pairs": len(result.pairs),
                "translation_mm": [round(float(v), 2) for v in found],
                "load_average_1min": load_average()[0],
            }
        )
        print(
            f"round {n + 1}: response {response_s:.2f} s (registration {result.alignment.seconds:.2f} s), "
            f"radiomics on both {peer_s:.2f} s",
            flush=True,
        )

    result_file = header(
        "response",
        {
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "lesions": args.lesions,
            "planted_shift_mm": list(SHIFT_MM),
            "rounds": args.rounds,
            "model": f"{signature.algorithm.name} {signature.algorithm.version} (DEMO package)",
            "peer": "the radiomics pipeline on the baseline and on the follow-up, back to back",
        },
        load_start,
    )
    summary = {
        "response_s": spread([r["response_s"] for r in rounds]),
        "registration_s": spread([r["registration_s"] for r in rounds]),
        "peer_s": spread([r["peer_s"] for r in rounds]),
        "ratio_response_to_peer": round(statistics.median(r["ratio"] for r in rounds), 2),
    }
    result_file |= {"summary": summary, "rounds": rounds}
    path = write_results("response", result_file)
    print(
        markdown_table(
            ["pipeline", "seconds, median (min-max)"],
            [
                [
                    "response (both studies, registration, matching, signature)",
                    f"{summary['response_s']['median']:.2f} "
                    f"({summary['response_s']['min']:.2f}-{summary['response_s']['max']:.2f})",
                ],
                ["of which rigid registration", f"{summary['registration_s']['median']:.2f}"],
                ["peer: radiomics on both studies", f"{summary['peer_s']['median']:.2f}"],
            ],
        )
    )
    print(f"response / peer: {summary['ratio_response_to_peer']}")
    print(f"load average start {load_start}, end {result_file['load_average_end']}; written {path}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
