// Drives the gateway's fleet dashboard in Debian's headless Chromium for tests/dashboard.rs.
// Usage: node dashboard.mjs <gateway url> <admin token> <clinics> <clinic to watch> <screenshot>
// Talks to the Rust test over stdio: prints READY once every tile is connected, waits for a
// line STOPPED (the test stopped the watched clinic's agent), prints OFFLINE <ms> when that
// tile turns offline, saves the screenshot, prints DONE. Any failure: a message and exit 1.
import { fail, launch } from "./launch.mjs";
import readline from "node:readline";

const [url, token, count, watch, shot] = process.argv.slice(2);
const browser = await launch();
try {
  const page = await browser.newPage({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
  page.on("pageerror", (e) => fail("page error: " + e.message));
  await page.goto(`${url}/#token=${encodeURIComponent(token)}&interval=250`);
  await page.waitForFunction((n) => document.querySelectorAll('.tile[data-state="connected"]').length >= n,
    Number(count), { timeout: 30000 });
  // The token left the address bar; the counters add up.
  if (page.url().includes(token)) fail("token still in the URL");
  const connected = Number(await page.textContent("#n-connected"));
  if (connected !== Number(count)) fail(`header counts ${connected} connected, expected ${count}`);
  // Filtering narrows the grid to one clinic; clearing brings all back.
  await page.fill("#filter", watch);
  const shown = await page.locator(".tile").count();
  if (shown !== 1) fail(`filter '${watch}' shows ${shown} tiles`);
  await page.fill("#filter", "");
  if ((await page.locator(".tile").count()) !== Number(count)) fail("clearing the filter");
  // Sorting by clinic id puts them in order.
  await page.selectOption("#sort", "id");
  const ids = await page.$$eval(".tile", (ts) => ts.map((t) => t.dataset.clinic));
  if (ids.join() !== [...ids].sort().join()) fail("sort by id: " + ids.join());
  await page.selectOption("#sort", "problems");
  // Each tile names its agent's version; a clinic with nothing waiting is caught up.
  const ver = (await page.textContent(`.tile[data-clinic="${watch}"] .ver`)).trim();
  if (!/^v\d+\.\d+/.test(ver)) fail(`agent version on the tile: '${ver}'`);
  // The channels strip: the fleet's call pops and check-ins encrypt fields, notices do not.
  await page.waitForSelector('#channels .channel[data-channel="voip.call"]', { timeout: 15000 });
  const sealed = await page.$$eval("#channels .channel", (cs) =>
    Object.fromEntries(cs.map((c) => [c.dataset.channel, c.dataset.encrypted])));
  if (sealed["voip.call"] !== "yes" || sealed["frontdesk.checkin"] !== "yes" || sealed["notice.broadcast"] !== "no")
    fail("encrypted channels on the strip: " + JSON.stringify(sealed));
  console.log("READY");
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) { if (line.trim() === "STOPPED") break; }
  rl.close();
  const t0 = Date.now();
  await page.waitForSelector(`.tile[data-clinic="${watch}"][data-state="offline"]`, { timeout: 30000 });
  console.log("OFFLINE " + (Date.now() - t0));
  // Problems first: the offline clinic leads the grid.
  const first = await page.$eval(".tile", (t) => t.dataset.clinic);
  if (first !== watch) fail(`offline clinic not first (first is ${first})`);
  const offline = Number(await page.textContent("#n-offline"));
  if (offline !== 1) fail(`header counts ${offline} offline`);
  // The tile says since when and why without hovering: "offline 3s" and the last close.
  const st = await page.textContent(`.tile[data-clinic="${watch}"] .st`);
  if (!/^offline \d+[smh]$/.test(st.trim())) fail(`offline tile's state line: '${st}'`);
  const why = (await page.textContent(`.tile[data-clinic="${watch}"] .why`)).trim();
  if (!why) fail("offline tile does not say why");
  if (!(await page.isVisible(`.tile[data-clinic="${watch}"] .why`))) fail("the reason is hidden");
  const last = (await page.textContent(`.tile[data-clinic="${watch}"] .last-event`)).trim();
  if (!/ago$/.test(last)) fail(`last event: '${last}'`);
  await page.screenshot({ path: shot, fullPage: true });
  console.log("DONE");
} catch (e) {
  fail(String(e && e.message || e).split("\n")[0]);
} finally {
  await browser.close();
}
process.exit(0);
