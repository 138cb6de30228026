"""M1-M4 networks and wrappers: shapes, gradients, reference parameter counts, determinism, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from inference.networks import (
    FIVE_LABELS,
    GROUPED_LABELS,
    Covariates,
    DeepRadInput,
    DeepRadScoreNet,
    EfficientNetAttention,
    M1Model,
    M2Model,
    M3Model,
    M4Model,
    MultiViewInput,
    MultiViewMultiTask,
    ResNetKRAS,
    ZScore,
    architecture_keys,
    build_model,
    build_network,
    default_device,
    encode_covariates,
    label_problem,
)
from inference.networks.m2_multiview import (
    MIN_VIEW_SIZE,
    AttentionModule,
    HourglassMask,
    InceptionAttentionTrunk,
    block35,
)
from inference.networks.m3_efficientnet import EfficientNetB0Backbone
from inference.networks.m4_deep_radscore import DenseNetBackbone

CPU = torch.device("cpu")
Z_HU = ZScore(40.0, 100.0)
Z_GREY = ZScore(100.0, 50.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest single-threaded on shared cores (no OpenMP oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(factory):  # paper-sized networks: count parameters without allocating memory
    with torch.device("meta"):
        return factory()


def small_m1() -> ResNetKRAS:
    return ResNetKRAS(width=0.25)


def small_m2(**kw) -> MultiViewMultiTask:
    return MultiViewMultiTask(0.0625, repeats=(1, 1, 1), mask_depths=(1, 1, 1), head_dims=(16, 8), **kw)


def small_m3(labels: int = 5) -> EfficientNetAttention:
    return EfficientNetAttention(labels, 0.25, 0.25, heads=4)


def small_m4(labels: int = 2, **kw) -> DeepRadScoreNet:
    return DeepRadScoreNet(labels, 0.25, blocks=(2, 2, 2, 2), hidden=16, **kw)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- reference parameter counts (paper-sized, built on the meta device) -----------------------------


def test_densenet121_backbone_matches_torchvision_count():
    # torchvision densenet121: 7,978,856 parameters in total; its classifier Linear(1024, 1000) has
    # 1024 * 1000 + 1000 = 1,025,000, so the feature extractor (up to norm5) has 6,953,856.
    assert n_params(on_meta(lambda: DenseNetBackbone(in_channels=3))) == 6_953_856
    # One grey input channel: conv0 loses 2 input channels x 64 filters x 7 x 7 = 6,272.
    assert n_params(on_meta(lambda: DenseNetBackbone(in_channels=1))) == 6_953_856 - 6_272 == 6_947_584


def test_efficientnet_b0_backbone_matches_torchvision_count():
    # torchvision / timm efficientnet_b0: 5,288,548 in total; classifier Linear(1280, 1000) has
    # 1,281,000, so the feature extractor (stem .. 1x1 head conv + BN) has 4,007,548.
    assert n_params(on_meta(lambda: EfficientNetB0Backbone(in_channels=3))) == 4_007_548
    # One input channel: the 3x3 stem loses 2 x 32 x 3 x 3 = 576.
    assert n_params(on_meta(lambda: EfficientNetB0Backbone(in_channels=1))) == 4_007_548 - 576 == 4_006_972


def test_inception_resnet_v2_trunk_matches_timm_count():
    # timm inception_resnet_v2: 55,843,464 in total; classifier Linear(1536, 1000) has 1,537,000,
    # so stem .. conv2d_7b has 54,306,464. attention=False is that network exactly.
    plain = on_meta(lambda: InceptionAttentionTrunk(3, attention=False))
    assert n_params(plain) == 54_306_464
    # The three hourglass mask branches (depths 2/1/1: 3 + 1 + 1 inception-resnet units plus the
    # BN-ReLU-1x1 conv heads) add 14,897,408.
    assert n_params(on_meta(lambda: InceptionAttentionTrunk(3))) == 54_306_464 + 14_897_408


def test_paper_sized_method_networks():
    # M1: stem 1*32*25 + BN 2*32 = 864; 18 convs of 32*32*25 + BN 64 = 25,664 each; FC 32*2 + 2 = 66.
    assert n_params(on_meta(ResNetKRAS)) == 864 + 18 * 25_664 + 66 == 462_882
    # M3: 1-channel B0 backbone + MultiheadAttention(1280) 4*1280^2 + 4*1280 + classifier 1280*5 + 5.
    assert n_params(on_meta(EfficientNetAttention)) == 4_006_972 + 6_558_720 + 6_405 == 10_572_097
    # M4 (2 endpoints): 1-channel DenseNet121 + FC1 (1024 + 2 RadScores) * 128 + 128 + FC2 128 * 2 + 2.
    assert n_params(on_meta(lambda: DeepRadScoreNet(2))) == 6_947_584 + 131_456 + 258 == 7_079_298
    # M2: per view: 1->3 conv (30) + attention trunk (69,203,872) + 2 heads of
    # (1536 + 8) * 256 + 256 + 256 * 128 + 128 + 128 * 2 + 2 = 428,674; 9 views; fusion 2 * 9 * 2 + 2.
    per_view = 30 + 69_203_872 + 2 * 428_674
    assert n_params(on_meta(MultiViewMultiTask)) == 9 * per_view + 38 == 630_551_288
    shared = on_meta(lambda: MultiViewMultiTask(shared_views=True))
    assert n_params(shared) == per_view + 38


def test_paper_sized_networks_run_at_tiny_sizes():
    with torch.inference_mode():
        assert ResNetKRAS().eval()(torch.randn(1, 1, 12, 12)).shape == (1, 2)
        assert EfficientNetAttention(len(GROUPED_LABELS)).eval()(torch.randn(1, 1, 64, 64)).shape == (1, 3)
        assert DeepRadScoreNet(3).eval()(torch.randn(1, 1, 32, 32), torch.zeros(1, 2)).shape == (1, 3)
        trunk = InceptionAttentionTrunk(3).eval()
        assert trunk(torch.randn(1, 3, MIN_VIEW_SIZE, MIN_VIEW_SIZE)).shape == (1, 1536)


# --- shapes and a training step for the small variants ------------------------------------------


def _step(network: nn.Module, *inputs: torch.Tensor, outputs: int) -> None:
    network.train()
    out = network(*inputs)
    assert out.shape == (inputs[0].shape[0], outputs)
    loss = nn.functional.binary_cross_entropy_with_logits(out, torch.ones_like(out))
    loss.backward()
    missing = [name for name, p in network.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in network.parameters())


def test_m1_forward_backward():
    _step(small_m1(), torch.randn(3, 1, 20, 20), outputs=2)


def test_m1_is_six_blocks_of_three_5x5_convs():
    net = ResNetKRAS()
    assert len(net.blocks) == 6
    convs = [m for m in net.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 18
    assert {c.kernel_size for c in convs} == {(5, 5)}
    assert isinstance(net.pool, nn.AdaptiveMaxPool2d)


def test_m2_forward_backward_per_view_and_shared():
    views, cov = torch.randn(2, 9, MIN_VIEW_SIZE, MIN_VIEW_SIZE), torch.zeros(2, 8)
    _step(small_m2(), views, cov, outputs=2)
    _step(small_m2(shared_views=True), views, cov, outputs=2)


def test_m2_view_outputs_and_fusion():
    net = small_m2().eval()
    views, cov = torch.randn(2, 9, MIN_VIEW_SIZE, MIN_VIEW_SIZE), torch.zeros(2, 8)
    with torch.no_grad():
        o = net.view_outputs(views, cov)
        assert o.shape == (2, 2, 9, 2)
        assert ((o >= 0) & (o <= 1)).all()
        expected = (o * net.fusion_weight).sum(dim=(2, 3)) + net.fusion_bias  # paper eq. 7-8
        torch.testing.assert_close(net(views, cov), expected)
    with pytest.raises(ValueError, match="expected 9 views"):
        net(views[:, :8], cov)
    with pytest.raises(ValueError, match="covariates"):
        net(views, torch.zeros(2, 7))


def test_attention_module_is_t_times_one_plus_s():
    trunk = nn.Conv2d(4, 4, 1)
    mask = nn.Conv2d(4, 4, 1)
    module = AttentionModule(trunk, mask)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(module(x), trunk(x) * (1 + torch.sigmoid(mask(x))))
        assert torch.equal(AttentionModule(trunk, None)(x), trunk(x))


@pytest.mark.parametrize("size", [1, 3, 7, 8, 35])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_hourglass_mask_keeps_the_feature_map_size(size: int, depth: int):
    mask = HourglassMask(lambda: block35(8, 0.125), 8, depth).eval()
    with torch.no_grad():
        assert mask(torch.randn(1, 8, size, size)).shape == (1, 8, size, size)


def test_m3_forward_backward_both_label_sets():
    _step(small_m3(len(FIVE_LABELS)), torch.randn(2, 1, 32, 32), outputs=5)
    _step(small_m3(len(GROUPED_LABELS)), torch.randn(2, 1, 32, 32), outputs=3)
    baseline = EfficientNetAttention(3, 0.25, 0.25, attention=False)
    assert baseline.attention is None
    _step(baseline, torch.randn(2, 1, 32, 32), outputs=3)


def test_m3_uses_the_b0_stage_table():
    net = EfficientNetB0Backbone()
    assert len(net.blocks) == 16  # 1 + 2 + 2 + 3 + 3 + 4 + 1
    kernels = [b.depthwise.conv.kernel_size[0] for b in net.blocks]
    assert kernels == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    channels = [b.project.conv.out_channels for b in net.blocks]
    assert channels == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    assert [b.depthwise.conv.stride[0] for b in net.blocks] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert net.blocks[0].se.reduce.out_channels == 8  # SE on int(32 * 0.25)


@pytest.mark.parametrize("fusion", ["input", "output"])
def test_m4_forward_backward_and_radscore_fusion(fusion: str):
    net = small_m4(fusion=fusion)
    x, scores = torch.randn(2, 1, 32, 32), torch.randn(2, 2)
    _step(net, x, scores, outputs=2)
    net.eval()
    with torch.no_grad():
        assert net.deep_features(x, scores).shape == (2, 16)
        # the RadScores reach the output: changing them changes the logits
        assert not torch.allclose(net(x, scores), net(x, scores + 3.0))
    with pytest.raises(ValueError, match="radscores"):
        net(x, torch.zeros(2, 3))


def test_densenet121_block_structure():
    net = DenseNetBackbone()
    assert net.out_channels == 1024
    growths = [m.layers[-1].out_channels for m in net.features if m.__class__.__name__ == "_DenseLayer"]
    assert len(growths) == 6 + 12 + 24 + 16
    assert set(growths) == {32}


# --- wrappers ------------------------------------------------------------------------------------


def test_m1_wrapper_probabilities_and_normalisation():
    model = M1Model(small_m1(), ("KRAS",), normalisation=Z_HU, device=CPU, batch_size=2)
    crops = np.full((3, 24, 24), 140.0, dtype=np.float32)
    (batch,) = model.pre_process(crops)
    assert batch.shape == (3, 1, 24, 24) and batch.dtype == torch.float32
    assert torch.allclose(batch, torch.ones_like(batch))  # (140 - 40) / 100, the package's statistics
    probs = model(crops)
    assert len(probs) == 3 and set(probs[0]) == {"KRAS"}
    assert all(0.0 < p["KRAS"] < 1.0 for p in probs)


def test_m1_softmax_is_p_mutant():
    model = M1Model(small_m1(), normalisation=Z_HU, device=CPU)
    probs = model.post_process(torch.tensor([[0.0, 0.0], [0.0, np.log(3.0)]]))
    assert probs[0]["KRAS"] == pytest.approx(0.5)
    assert probs[1]["KRAS"] == pytest.approx(0.75)


def test_m2_wrapper_with_unknown_covariates():
    model = M2Model(small_m2(), normalisation=Z_HU, age=ZScore(60.0, 10.0), device=CPU)
    views = np.random.default_rng(0).normal(0, 200, (2, 9, MIN_VIEW_SIZE, MIN_VIEW_SIZE)).astype(np.float32)
    probs = model(MultiViewInput(views, (Covariates(70.0, "M", True), Covariates())))
    assert [set(p) for p in probs] == [{"EGFR", "KRAS"}] * 2
    assert model(MultiViewInput(views))  # covariates omitted = all unknown
    with pytest.raises(ValueError, match="S >= 75"):
        model.pre_process(MultiViewInput(views[:, :, :64, :64]))
    with pytest.raises(ValueError, match="covariate records"):
        model.pre_process(MultiViewInput(views, (Covariates(),)))


def test_encode_covariates_one_hot_with_unknown():
    enc = encode_covariates(
        [Covariates(70.0, "M", True), Covariates(50.0, "F", False), Covariates(None, None, None)], ZScore(60.0, 10.0)
    )
    assert enc.tolist() == [
        [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
        [-1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0],
    ]


def test_m3_wrapper_takes_windowed_grey_values():
    model = M3Model(small_m3(3), GROUPED_LABELS, normalisation=Z_GREY, device=CPU)
    crops = np.random.default_rng(1).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    probs = model(crops)
    assert [list(p) for p in probs] == [list(GROUPED_LABELS)] * 4
    as_float = model(crops.astype(np.float32))  # inference.imaging.roi.m3_input gives float32 in [0, 255]
    assert [p["RAS"] for p in as_float] == pytest.approx([p["RAS"] for p in probs], abs=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        model.pre_process(crops.astype(np.float32) - 1000.0)  # HU, not windowed
    with pytest.raises(ValueError, match="outputs but labels"):
        M3Model(small_m3(3), FIVE_LABELS, normalisation=Z_GREY, device=CPU)


def test_m4_wrapper_applies_radscore_statistics():
    model = M4Model(
        small_m4(2),
        ("EGFR", "KRAS"),
        normalisation=Z_HU,
        radscore_normalisation=(ZScore(1.0, 2.0), ZScore(-1.0, 0.5)),
        device=CPU,
    )
    patches = np.zeros((2, 32, 32), dtype=np.float32)
    _, scores = model.pre_process(DeepRadInput(patches, np.array([[3.0, 0.0], [1.0, -1.0]])))
    assert scores.tolist() == [[1.0, 2.0], [0.0, 0.0]]
    assert len(model(DeepRadInput(patches, np.zeros((2, 2))))) == 2
    with pytest.raises(ValueError, match="trailing shape"):
        model.pre_process(DeepRadInput(patches, np.zeros((2, 3))))
    with pytest.raises(ValueError, match="RadScore rows"):
        model.pre_process(DeepRadInput(patches, np.zeros((1, 2))))


def test_input_validation():
    model = M1Model(small_m1(), normalisation=Z_HU, device=CPU)
    with pytest.raises(ValueError, match="3 dimensions"):
        model.pre_process(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        model.pre_process(np.full((1, 8, 8), np.nan))
    with pytest.raises(ValueError, match="empty batch"):
        model.pre_process(np.zeros((0, 8, 8)))
    with pytest.raises(ValueError, match="one gene"):
        M1Model(small_m1(), ("KRAS", "NRAS"), normalisation=Z_HU)
    with pytest.raises(ValueError, match="std"):
        ZScore(0.0, 0.0)


def test_eval_is_deterministic_and_batch_independent():
    rng = np.random.default_rng(2)
    cases = [
        (M1Model(small_m1(), normalisation=Z_HU, device=CPU, batch_size=1), rng.normal(40, 100, (5, 20, 20))),
        (
            M3Model(small_m3(), normalisation=Z_GREY, device=CPU, batch_size=1),
            rng.integers(0, 256, (5, 32, 32), dtype=np.uint8),
        ),
        (
            M4Model(small_m4(1), ("KRAS",), normalisation=Z_HU, device=CPU, batch_size=1),
            DeepRadInput(rng.normal(0, 100, (5, 32, 32)), rng.normal(0, 1, (5, 2))),
        ),
    ]
    for model, inputs in cases:
        one_by_one = model(inputs)
        assert model(inputs) == one_by_one  # bit-identical on a repeat
        model.batch_size = 5
        together = model(inputs)
        for a, b in zip(one_by_one, together, strict=True):
            assert a == pytest.approx(b, abs=1e-5)
        assert not model.network.training


def test_predict_leaves_no_autograd_state():
    model = M1Model(small_m1(), normalisation=Z_HU, device=CPU)
    out = model.predict(model.pre_process(np.zeros((2, 16, 16))))
    assert not out.requires_grad and out.device == CPU


def test_default_device(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")


# --- factory used by the registry ----------------------------------------------------------------


def test_build_network_and_model_from_package_tables():
    net = build_network("m3", GROUPED_LABELS, {"width": 0.25, "depth": 0.25, "heads": 4})
    assert isinstance(net, EfficientNetAttention) and net.classifier.out_features == 3
    model = build_model("m3", net, GROUPED_LABELS, {"mean": 100.0, "std": 50.0}, device=CPU)
    assert isinstance(model, M3Model) and model.normalisation == Z_GREY
    m2 = build_network("m2", ("EGFR", "KRAS"), {"width": 0.0625, "repeats": [1, 1, 1], "mask_depths": [1, 1, 1]})
    assert isinstance(m2, MultiViewMultiTask) and m2.tasks == 2
    with pytest.raises(ValueError, match="unknown architecture key"):
        build_network("m1", ("KRAS",), {"widht": 0.5})
    with pytest.raises(ValueError, match="one gene"):
        build_network("m1", ("KRAS", "NRAS"))
    with pytest.raises(ValueError, match="unknown network method"):
        build_network("m9", ("KRAS",))
    with pytest.raises(ValueError, match="missing"):
        build_model("m2", m2, ("EGFR", "KRAS"), {"mean": 0.0, "std": 1.0})
    with pytest.raises(TypeError, match="network"):
        build_model("m1", net, ("KRAS",), {"mean": 0.0, "std": 1.0})
    assert "num_labels" not in architecture_keys("m3") and "width" in architecture_keys("m3")


def test_label_problem_compares_labels_with_weights():
    state = small_m3(5).state_dict()
    assert label_problem("m3", FIVE_LABELS, state) is None
    assert "need 3 network outputs but the weights have 5" in label_problem("m3", GROUPED_LABELS, state)
    assert label_problem("m1", ("KRAS",), small_m1().state_dict()) is None
    assert "exactly one label" in label_problem("m1", ("KRAS", "NRAS"), small_m1().state_dict())
    assert "not an m4 network" in label_problem("m4", ("KRAS",), state)
