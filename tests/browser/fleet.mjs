// Drives the fleet dashboard at fleet scale for tests/dashboard.rs (simulated clinics).
// Usage: node fleet.mjs <gateway url> <expected counts as JSON> <failing clinic> <flagged clinic>
//        <lagging clinic> <offline clinic> <screenshot prefix>
// The counts: {"tiles", "connected", "offline", "lagging", "failed", "flagged", "trouble"}.
// Prints READY when the page shows them all, then saves <prefix>-compact.png (the whole fleet on
// one screen) and <prefix>-detail.png (full tiles, problems first), checks what the tiles say and
// prints DONE. Any failure: FAIL and a message, exit 1.
import { fail, launch } from "./launch.mjs";

const [url, countsJson, failing, flagged, lagging, offline, shot] = process.argv.slice(2);
const want = JSON.parse(countsJson);
const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("pageerror", (e) => fail("page error: " + e.message));
  await page.goto(`${url}/#interval=250`);
  // Every tile and every header count as the test made them (the page refreshes 4 times a second).
  const header = async () => Object.fromEntries(await Promise.all(
    ["connected", "offline", "lagging", "failed", "flagged"].map(async (k) => [k, Number(await page.textContent("#n-" + k))])));
  const deadline = Date.now() + 60000;
  let seen;
  for (;;) {
    seen = { tiles: await page.locator(".tile").count(), ...(await header()),
             trouble: await page.locator('.tile[data-trouble="true"]').count() };
    if (Object.keys(want).every((k) => seen[k] === want[k])) break;
    if (Date.now() > deadline) fail(`the page shows ${JSON.stringify(seen)}, expected ${JSON.stringify(want)}`);
    await page.waitForTimeout(250);
  }
  console.log("READY");
  // Above 150 clinics the grid starts compact: the whole fleet fits one screen.
  if (!(await page.isChecked("#compact"))) fail(`${want.tiles} clinics and the grid is not compact`);
  const bottom = await page.$eval("main", (m) => m.getBoundingClientRect().bottom);
  if (bottom > 1000) fail(`the compact grid is ${Math.round(bottom)} px tall: it does not fit one 1000 px screen`);
  // Problems first: the offline clinics, then the lagging ones, then those with failed
  // updates or flagged events.
  const order = await page.$$eval(".tile", (ts) => ts.map((t) => [t.dataset.state, t.dataset.lagging, t.dataset.trouble]));
  const rank = ([state, lag, trouble]) => state !== "connected" ? 0 : lag === "true" ? 1 : trouble === "true" ? 2 : 3;
  for (let i = 1; i < order.length; i++) {
    if (rank(order[i]) < rank(order[i - 1])) fail(`tile ${i} (${order[i]}) after (${order[i - 1]}): problems not first`);
  }
  await page.screenshot({ path: `${shot}-compact.png` });
  // Full tiles: what each problem says.
  await page.uncheck("#compact");
  const text = async (clinic, sel) => (await page.textContent(`.tile[data-clinic="${clinic}"] ${sel}`)).trim();
  const upd = await text(failing, ".backlog");
  if (upd !== "2 failed") fail(`failing clinic's updates: '${upd}'`);
  if (!(await page.$eval(`.tile[data-clinic="${failing}"] .backlog`, (e) => e.classList.contains("bad")))) fail("failed updates not marked");
  const fl = await text(flagged, ".flagged");
  if (fl !== "1") fail(`flagged clinic's count: '${fl}'`);
  const lag = await text(lagging, ".lag");
  if (!/^19997 ev · \d+(\.\d)?[smhd]$/.test(lag)) fail(`lagging clinic's lag: '${lag}'`);
  // A clinic whose connection just ended (no close frame): offline, and why.
  const why = await text(offline, ".why");
  if (why !== "connection lost") fail(`offline clinic's reason: '${why}'`);
  const caught = await text(failing, ".lag");
  if (caught !== "caught up") fail(`a caught-up clinic's lag: '${caught}'`);
  const ver = await text(failing, ".ver");
  if (ver !== "v2.4.1") fail(`agent version: '${ver}'`);
  await page.screenshot({ path: `${shot}-detail.png` });
  console.log("DONE");
} catch (e) {
  fail(String(e && e.message || e).split("\n")[0]);
} finally {
  await browser.close();
}
process.exit(0);
