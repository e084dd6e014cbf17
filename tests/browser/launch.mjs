// What the browser tests share: Chromium headless as the CI machine runs it, and how a failure
// is told to the Rust test (a FAIL line, exit 1).
import { chromium } from "playwright-core";

export const fail = (why) => { console.log("FAIL " + why); process.exit(1); };

export const launch = () => chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--no-first-run", "--disable-extensions"],
});
