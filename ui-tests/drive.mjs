// Drives Debian's headless chromium through the session browser for tests/test_ui.py.
//
// Input: one JSON object on argv[2] (base URL, key, the sessions pytest made, a ui-link, where to
// put screenshots). Output: one JSON object on stdout with what the browser saw, for pytest to
// check. Every wait is a wait-for-condition with a generous timeout; a step that never happens
// throws, and the process exits non-zero with the step's name.
import puppeteer from "puppeteer-core";

const plan = JSON.parse(process.argv[2]);
const WAIT = 30_000;
const out = { steps: [], pageErrors: [], realtimeRequests: [] };
let step = "launch";

function offsetOf(index) {
  return "0000000000000000_" + String(index).padStart(16, "0");
}

async function api(method, path, body) {
  const response = await fetch(plan.baseUrl + path, {
    method,
    headers: { Authorization: `Bearer ${plan.key}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

async function rowIds(page) {
  return page.$$eval("tr.session-row", (rows) => rows.map((row) => row.dataset.id));
}

async function waitRows(page, expected) {
  await page.waitForFunction(
    (ids) => {
      const got = [...document.querySelectorAll("tr.session-row")].map((row) => row.dataset.id);
      return JSON.stringify(got) === JSON.stringify(ids);
    },
    { timeout: WAIT },
    expected,
  );
}

async function recordIndices(page) {
  return page.$$eval("#records li.record", (items) => items.map((li) => Number(li.dataset.index)));
}

const browser = await puppeteer.launch({
  executablePath: plan.chromium,
  headless: true,
  args: ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 900 });
  page.on("pageerror", (error) => out.pageErrors.push(String(error)));
  page.on("dialog", (dialog) => dialog.accept());
  // The network as the browser sees it: every live-tail request and the Last-Event-ID it sent.
  const cdp = await page.createCDPSession();
  await cdp.send("Network.enable");
  // The two events of one request may come in either order: join them by request id.
  const sent = new Map();
  const sentHeaders = new Map();
  cdp.on("Network.requestWillBeSent", (event) => {
    if (event.request.url.includes("/realtime/v1/") && event.request.method === "GET") {
      sent.set(event.requestId, event.request.url);
    }
  });
  cdp.on("Network.requestWillBeSentExtraInfo", (event) => {
    const headers = Object.fromEntries(Object.entries(event.headers).map(([k, v]) => [k.toLowerCase(), v]));
    sentHeaders.set(event.requestId, headers["last-event-id"] ?? null);
  });
  const realtime = () =>
    [...sent.entries()].map(([id, url]) => ({ url, lastEventId: sentHeaders.get(id) ?? null }));

  step = "open /ui and sign in";
  await page.goto(`${plan.baseUrl}/ui?tailTimeout=${plan.tailTimeout}`, { waitUntil: "load" });
  await page.waitForSelector("#signin-form", { timeout: WAIT });
  await page.type("#credential", plan.key);
  await page.click("#sign-in");
  await page.waitForSelector("tr.session-row", { timeout: WAIT });
  out.signedInUrl = page.url();
  out.storedCredential = (await page.evaluate(() => sessionStorage.getItem("threadline.credential"))) === plan.key;

  step = "filter by type, page size 10";
  await page.type("#f-type", plan.listType);
  await page.select("#page-size", "10");
  await page.click("#apply");
  const ids = plan.listIds; // newest first
  await waitRows(page, ids.slice(0, 10));
  await page.waitForFunction((n) => document.querySelector("#count-total")?.textContent === String(n), { timeout: WAIT }, ids.length);
  out.counts = await page.$eval("#counts", (el) => el.textContent);
  out.listSource = await page.$eval("#source", (el) => el.textContent);
  await page.waitForFunction(() => /replication lag/.test(document.querySelector("#lag")?.textContent || ""), { timeout: WAIT });
  out.lag = await page.$eval("#lag", (el) => el.textContent);

  step = "page forward and back";
  out.pages = [await rowIds(page)];
  await page.click("#next-page");
  await waitRows(page, ids.slice(10, 20));
  out.pages.push(await rowIds(page));
  await page.click("#next-page");
  await waitRows(page, ids.slice(20));
  out.pages.push(await rowIds(page));
  out.nextDisabledOnLastPage = await page.$eval("#next-page", (el) => el.disabled);
  await page.click("#prev-page");
  await waitRows(page, ids.slice(10, 20));
  out.pages.push(await rowIds(page));

  step = "filter by tag and status";
  await page.click("#f-tags");
  await page.type("#f-tags", plan.tag);
  await page.click("input.f-status[value=ACTIVE]");
  await page.click("#apply");
  await waitRows(page, plan.taggedIds);
  out.taggedRows = await rowIds(page);
  await page.screenshot({ path: `${plan.screenshots}/ui-sessions.png`, fullPage: true });

  step = "open a session and read its transcript";
  await page.goto(`${plan.baseUrl}/ui?tailTimeout=${plan.tailTimeout}#/session/${plan.sessionId}`, { waitUntil: "load" });
  await page.waitForFunction(() => document.querySelectorAll("#records li.record").length === 50, { timeout: WAIT });
  out.firstPage = await recordIndices(page);
  out.firstRecordText = await page.$eval("#records li.record pre", (el) => el.textContent);
  out.metadata = await page.$eval("#metadata", (el) => el.textContent);
  await page.click("#latest");
  await page.waitForFunction((n) => document.querySelector("#records li.record:last-child")?.dataset.index === String(n - 1), { timeout: WAIT }, plan.records);
  out.latestPage = await recordIndices(page);
  await page.type("#jump-offset", offsetOf(5));
  await page.click("#jump");
  await page.waitForFunction(() => document.querySelector("#records li.record")?.dataset.index === "5", { timeout: WAIT });
  out.jumpFirst = (await recordIndices(page))[0];

  step = "live tail: a record appended through the API appears";
  await page.click("#live");
  await page.waitForFunction(() => document.querySelector("#live-state")?.dataset.state === "live", { timeout: WAIT });
  await page.waitForFunction((n) => document.querySelector("#records")?.dataset.last === String(n - 1), { timeout: WAIT }, plan.records);
  let next = plan.records;
  await api("POST", `/realtime/v1/sessions/${plan.sessionId}/out/append`, { n: next, text: "appended live" });
  await page.waitForSelector(`#records li.record[data-index="${next}"]`, { timeout: WAIT });
  next += 1;

  step = "live tail: the connection ends (server timeout) and EventSource resumes with Last-Event-ID";
  const resumed = () => realtime().filter((r) => r.lastEventId);
  const deadline = Date.now() + WAIT;
  while (resumed().length < 2) {
    if (Date.now() > deadline) throw new Error("EventSource did not reconnect with Last-Event-ID");
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  for (let i = 0; i < 3; i++) {
    await api("POST", `/realtime/v1/sessions/${plan.sessionId}/out/append`, [{ n: next }]);
    next += 1;
  }
  // One more reconnect after those appends, then one more record through the new connection.
  const before = resumed().length;
  while (resumed().length <= before) {
    if (Date.now() > deadline + WAIT) throw new Error("no second reconnect");
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await api("POST", `/realtime/v1/sessions/${plan.sessionId}/out/append`, { n: next });
  await page.waitForSelector(`#records li.record[data-index="${next}"]`, { timeout: WAIT });
  out.appendedThrough = next;
  out.liveIndices = await recordIndices(page);
  out.realtimeRequests = realtime();

  await page.screenshot({ path: `${plan.screenshots}/ui-session.png`, fullPage: true });

  step = "mint a token from the page";
  await page.click("#mint-token");
  await page.waitForSelector("#token-value", { timeout: WAIT });
  out.mintedToken = (await page.$eval("#token-value", (el) => el.value)).split(".").length === 3;

  step = "close the session from the page";
  await page.click("#close-session");
  await page.waitForSelector("#closed-banner", { timeout: WAIT });
  await page.waitForFunction(() => document.querySelector('dd[data-field="status"]')?.textContent === "CLOSED", { timeout: WAIT });
  out.closedStatus = await page.$eval('dd[data-field="status"]', (el) => el.textContent);
  out.closeDisabled = await page.$eval("#close-session", (el) => el.disabled);
  out.rootLineage = await page.$eval('dd[data-field="rootId"]', (el) => el.textContent);

  step = "a fork's page shows its lineage, linked to the parent";
  await page.goto(`${plan.baseUrl}/ui#/session/${plan.forkId}`, { waitUntil: "load" });
  await page.waitForSelector('dd[data-field="forkedFrom"] a', { timeout: WAIT });
  out.forkedFrom = await page.$eval('dd[data-field="forkedFrom"]', (el) => el.textContent);
  out.forkParentHref = await page.$eval('dd[data-field="forkedFrom"] a', (el) => el.getAttribute("href"));
  out.forkRootId = await page.$eval('dd[data-field="rootId"]', (el) => el.textContent);

  step = "phone-sized viewport";
  await page.setViewport({ width: 390, height: 844, isMobile: true });
  await page.goto(`${plan.baseUrl}/ui#/`, { waitUntil: "load" });
  await page.waitForSelector("tr.session-row", { timeout: WAIT });
  out.phoneOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);

  step = "a ui-link signs in read-only, the token leaves the address bar";
  const linkPage = await browser.newPage();
  linkPage.on("pageerror", (error) => out.pageErrors.push(String(error)));
  await linkPage.goto(plan.uiLink, { waitUntil: "load" });
  await linkPage.waitForSelector("tr.session-row", { timeout: WAIT });
  out.linkUrlAfter = linkPage.url();
  out.linkRows = (await rowIds(linkPage)).length;

  step = "/docs renders with every other host blocked";
  const docs = await browser.newPage();
  docs.on("pageerror", (error) => out.pageErrors.push(String(error)));
  const origin = new URL(plan.baseUrl).origin;
  out.blocked = [];
  out.docsRequests = [];
  await docs.setRequestInterception(true);
  docs.on("request", (request) => {
    const url = request.url();
    if (url.startsWith("data:") || url.startsWith("blob:") || new URL(url).origin === origin) {
      out.docsRequests.push(url.replace(origin, ""));
      request.continue();
    } else {
      out.blocked.push(url);
      request.abort();
    }
  });
  await docs.goto(`${plan.baseUrl}/docs`, { waitUntil: "load" });
  await docs.waitForFunction(() => document.querySelectorAll("[data-section-id]").length > 10, { timeout: WAIT });
  out.docsSections = await docs.$$eval("[data-section-id]", (els) => els.map((el) => el.getAttribute("data-section-id")));
  out.docsText = await docs.$eval("#redoc", (el) => el.innerText.slice(0, 20000));
  step = "done";
} catch (error) {
  out.failedStep = step;
  out.error = String(error && error.stack ? error.stack : error);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out));
process.exit(out.failedStep ? 1 : 0);
