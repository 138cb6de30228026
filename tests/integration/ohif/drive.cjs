// Drive OHIF in headless Debian Chromium with playwright-core (no browser download) and report
// what a person would see: the study, the Secondary Capture series, and the SR in OHIF's SR
// viewport. Prints one JSON object on stdout; test_ohif.py asserts on it.
//
// usage: NODE_PATH=<cache>/node_modules node drive.cjs '{"viewer": "http://127.0.0.1:PORT",
//          "study": "1.2...", "scImages": 4, "out": "/tmp/shots", "chromium": "/usr/bin/chromium"}'
// With "srs": ["AI KRAS M1 - DEMO, not for clinical use", ...] it opens each of those SR series
// instead (a fresh page each), and reports per SR whether OHIF draws it, offers to track it and
// lists its lesions (steps "sr:<description>").
'use strict';
const { chromium } = require('playwright-core');

const args = JSON.parse(process.argv[2]);
const report = { steps: {}, pageErrors: [], consoleErrors: [], consoleWarnings: [], httpErrors: [] };
const limit = args.timeoutSeconds || 150;
const guard = setTimeout(() => {
  report.fatal = `driver timed out after ${limit} s`;
  process.stdout.write(JSON.stringify(report));
  process.exit(2);
}, limit * 1000);

async function viewportState(page) {
  return page.evaluate(() => {
    const pane = document.querySelector('[data-cy="viewport-pane"]');
    const text = sel => [...document.querySelectorAll(sel)].map(e => e.innerText).join('\n');
    const box = pane ? pane.getBoundingClientRect() : null;
    return {
      viewportText: pane ? pane.innerText : '',
      overlay: text('[data-cy^="viewport-overlay"]'),
      box: box ? { x: box.x, y: box.y, width: box.width, height: box.height } : null,
      svgText: pane ? [...pane.querySelectorAll('svg text')].map(t => t.textContent).join('\n') : '',
    };
  });
}

async function step(name, page, action) {
  const started = Date.now();
  try {
    const extra = (await action()) || {};
    report.steps[name] = { ok: true, ...extra, ...(await viewportState(page)) };
  } catch (error) {
    report.steps[name] = { ok: false, error: String(error).split('\n')[0] };
  }
  report.steps[name].seconds = (Date.now() - started) / 1000;
  const path = `${args.out}/${name.replace(/[^A-Za-z0-9]+/g, '-').replace(/-+$/, '')}.png`;
  await page.screenshot({ path }).catch(() => {});
  report.steps[name].screenshot = path;
}

async function seriesLabel(page, modality) {
  return page.locator('[data-cy="series-modality-label"]', { hasText: new RegExp(`^${modality}$`) }).first();
}


function srItem(page, description) {
  // the study browser entry of the SR series with this exact description (SC series share it)
  const exact = new RegExp(`^${description.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`);
  return page
    .locator('[data-cy="study-browser-thumbnail-no-image"], [data-cy="study-browser-thumbnail"]')
    .filter({ has: page.locator('[data-cy="series-modality-label"]', { hasText: /^SR$/ }) })
    .filter({ has: page.locator('[data-cy="series-description-label"]', { hasText: exact }) })
    .first();
}

async function openStudy(page) {
  await page.goto(`${args.viewer}/viewer?StudyInstanceUIDs=${args.study}`, { waitUntil: 'load' });
  await page.locator('[data-cy="viewport-overlay-bottom-right"]', { hasText: 'I:1 (1/' }).waitFor({ timeout: 60000 });
  await page.waitForTimeout(1500);
}

async function waitForSrDrawing(page) {
  // an SR whose measurements OHIF can draw shows their labels (SVG text) in the viewport
  const labels = page.locator('[data-cy="viewport-pane"] svg text').first();
  let drawn = await labels.waitFor({ timeout: 15000 }).then(() => true, () => false);
  if (!drawn) {
    // OHIF 3.13 sometimes hydrates the SR after the key slice was rendered and draws its
    // annotations only at the next render of that slice: step one slice away and back.
    await page.locator('[data-cy="viewport-pane"]').first().hover();
    await page.keyboard.press('ArrowDown');
    await page.waitForTimeout(1000);
    await page.keyboard.press('ArrowUp');
    drawn = await labels.waitFor({ timeout: 10000 }).then(() => true, () => false);
    report.srRedrawn = true;
  }
  await page.waitForTimeout(2000);
  return drawn;
}

async function trackAndReadPanel(page) {
  // a structured report OHIF can load as measurements asks whether to track them; one it
  // cannot load ("not compatible with this application") does not ask
  const prompt = page.getByText('Do you want to continue tracking measurements', { exact: false }).first();
  const asked = await prompt.waitFor({ timeout: 15000 }).then(() => true, () => false);
  if (asked) {
    await page.getByRole('button', { name: 'Yes', exact: true }).first().click();
    await page.waitForTimeout(3000);
  }
  const panelButton = page.locator('[data-cy="trackedMeasurements-btn"]').first();
  const measurementsHeader = page.getByText(/^Measurements \(\d+\)/).first();
  if (!(await measurementsHeader.isVisible().catch(() => false)) && (await panelButton.count())) {
    await panelButton.click();
  }
  await page.waitForTimeout(1500);
  const panel = await page.evaluate(() => {
    const header = [...document.querySelectorAll('*')].find(
      e => e.children.length === 0 && /^Measurements \(\d+\)/.test(e.textContent.trim()),
    );
    let container = header;
    for (let i = 0; container && i < 6; i++) container = container.parentElement;
    return { header: header ? header.textContent.trim() : '', text: container ? container.innerText : '' };
  });
  return { asked, panel };
}

(async () => {
  const browser = await chromium.launch({
    executablePath: args.chromium || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    // the onboarding tour would cover the viewer: mark it as seen
    await page.addInitScript(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));
    page.on('pageerror', e => report.pageErrors.push(e.message));
    page.on('console', m => {
      if (m.type() === 'error') report.consoleErrors.push(m.text());
      if (m.type() === 'warning' && !report.consoleWarnings.includes(m.text())) report.consoleWarnings.push(m.text());
    });
    page.on('response', r => {
      if (r.status() >= 400) report.httpErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`);
    });

    await step('study', page, async () => {
      await openStudy(page);
      const series = await page.evaluate(() =>
        [...document.querySelectorAll('[data-cy="series-modality-label"]')].map(e => {
          const item = e.closest('[data-cy="study-browser-thumbnail"], [data-cy="study-browser-thumbnail-no-image"]');
          const description = item ? item.querySelector('[data-cy="series-description-label"]') : null;
          return { modality: e.innerText.trim(), description: description ? description.innerText.trim() : '' };
        }),
      );
      return { series };
    });

    if (args.srs) {
      for (const description of args.srs) {
        await step(`sr:${description}`, page, async () => {
          await openStudy(page);
          await srItem(page, description).dblclick();
          const drawn = await waitForSrDrawing(page);
          return { drawn, ...(await trackAndReadPanel(page)) };
        });
      }
      return;
    }

    await step('sc', page, async () => {
      await (await seriesLabel(page, 'OT')).dblclick();
      await page
        .locator('[data-cy="viewport-overlay-bottom-right"]', { hasText: `I:1 (1/${args.scImages})` })
        .waitFor({ timeout: 30000 });
      const close = page.locator('[data-cy="cine-player-close"]');
      if (await close.count()) await close.first().click();
      await page.waitForTimeout(2000);
    });

    await step('sc-lesion', page, async () => {
      // the next image of the series: the first lesion's page
      await page.locator('[data-cy="viewport-pane"]').first().hover();
      await page.keyboard.press('ArrowDown');
      await page
        .locator('[data-cy="viewport-overlay-bottom-right"]', { hasText: `I:2 (2/${args.scImages})` })
        .waitFor({ timeout: 15000 });
      await page.waitForTimeout(1500);
    });

    await step('sr', page, async () => {
      await (await seriesLabel(page, 'SR')).dblclick();
      return { drawn: await waitForSrDrawing(page) };
    });

    await step('sr-track', page, async () => trackAndReadPanel(page));
  } finally {
    await browser.close();
  }
})()
  .catch(error => {
    report.fatal = String(error);
  })
  .finally(() => {
    clearTimeout(guard);
    process.stdout.write(JSON.stringify(report));
  });
