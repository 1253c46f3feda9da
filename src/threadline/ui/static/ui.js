// Threadline session browser: one file, no build step, no dependencies.
//
// It talks to the same public API as any client. The credential (a secret key, or a read-only
// JWT from `threadline ui-link`) lives in sessionStorage and goes out as an Authorization header,
// never in a URL. The live tail uses EventSource, which cannot send headers: it gets a JWT in
// ?token= (a session token minted for the purpose, or the ui-link JWT itself).
(function () {
  "use strict";

  var STORE_KEY = "threadline.credential";
  var PAGE_SIZE_RECORDS = 50; // transcript records in the DOM at a time (paged, never the whole channel)
  var LIVE_KEEP = 200; // most records a live tail keeps on screen
  var STATUSES = ["ACTIVE", "CLOSED", "EXPIRED"];
  var SORTS = [
    ["-createdAt", "Newest first"],
    ["createdAt", "Oldest first"],
    ["-lastActiveAt", "Recently active"],
    ["lastActiveAt", "Least recently active"],
  ];
  var params = new URLSearchParams(location.search);
  // How long one live-tail connection lives before EventSource reconnects (server default 60 s).
  var TAIL_TIMEOUT = Math.max(1, Math.min(600, parseInt(params.get("tailTimeout") || "60", 10) || 60));

  var app = document.getElementById("app");
  var state = {
    filters: {},
    sort: "-createdAt",
    size: 20,
    cursor: null, // ["after"|"before", cursor]
    refreshTimer: null,
    tail: null,
  };

  // --- DOM helpers ----------------------------------------------------------------------------

  function h(tag, attrs) {
    var el = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      var value = attrs[key];
      if (value === null || value === undefined || value === false) return;
      if (key.slice(0, 2) === "on") el.addEventListener(key.slice(2), value);
      else if (key === "text") el.textContent = value;
      else el.setAttribute(key, value === true ? "" : value);
    });
    for (var i = 2; i < arguments.length; i++) append(el, arguments[i]);
    return el;
  }

  function append(el, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) child.forEach(function (c) { append(el, c); });
    else el.appendChild(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
  }

  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

  function fmtTime(iso) {
    if (!iso) return "—";
    var d = new Date(iso);
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function offsetOf(index) { return "0000000000000000_" + String(index).padStart(16, "0"); }

  function indexOf(offset) {
    var m = /^[0-9]{16}_([0-9]{16})$/.exec(offset || "");
    return m ? parseInt(m[1], 10) : null;
  }

  function pretty(value) {
    if (typeof value === "string") return value; // text records read as text
    return JSON.stringify(value, null, 2);
  }

  // --- API ------------------------------------------------------------------------------------

  function credential() { return sessionStorage.getItem(STORE_KEY); }

  function isJwt(value) { return !!value && value.split(".").length === 3; }

  function api(method, path, body) {
    var init = { method: method, headers: { Authorization: "Bearer " + credential() }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (response) {
      return response.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
        if (!response.ok) {
          var err = (data && data.error) || { code: "http_" + response.status, message: response.statusText };
          var error = new Error(err.code + ": " + err.message);
          error.status = response.status;
          throw error;
        }
        return { data: data, headers: response.headers };
      });
    });
  }

  function listQuery(extra) {
    var q = new URLSearchParams();
    Object.keys(state.filters).forEach(function (key) {
      if (state.filters[key]) q.set(key, state.filters[key]);
    });
    Object.keys(extra || {}).forEach(function (key) { q.set(key, extra[key]); });
    return q;
  }

  // --- Layout ---------------------------------------------------------------------------------

  function shell(content) {
    stopTimers();
    clear(app);
    var signedIn = !!credential();
    app.appendChild(
      h("header", { class: "bar" },
        h("a", { href: "#/", class: "brand" }, "Threadline"),
        h("span", { class: "grow" }),
        signedIn ? h("span", { id: "source", class: "muted", text: "" }) : null,
        signedIn ? h("span", { id: "lag", class: "muted", text: "" }) : null,
        h("a", { href: "/docs", class: "muted" }, "API docs"),
        signedIn ? h("button", { id: "sign-out", class: "link", onclick: signOut }, "Sign out") : null
      )
    );
    var main = h("main", {}, content);
    app.appendChild(main);
    if (signedIn) showLag();
    return main;
  }

  function banner(el, message, kind) {
    clear(el).appendChild(h("div", { class: "banner " + (kind || "error"), role: "alert" }, message));
  }

  function stopTimers() {
    if (state.refreshTimer) { clearInterval(state.refreshTimer); state.refreshTimer = null; }
    if (state.tail) { state.tail.stop(); state.tail = null; }
  }

  function showLag() {
    fetch("/readyz", { cache: "no-store" })
      .then(function (r) { return r.json(); })
      .then(function (body) {
        var lag = document.getElementById("lag");
        if (!lag) return;
        var repl = body.replication || {};
        var text = "replication lag " + (repl.lagBytes === null || repl.lagBytes === undefined ? "?" : repl.lagBytes + " B");
        if (typeof repl.lagSeconds === "number") text += " / " + repl.lagSeconds.toFixed(2) + " s";
        lag.textContent = text;
      })
      .catch(function () {});
  }

  // --- Sign in --------------------------------------------------------------------------------

  function signIn() {
    var message = h("div", {});
    var input = h("input", {
      id: "credential", type: "password", autocomplete: "off", required: true,
      placeholder: "tl_sk_… or a token", "aria-label": "Secret key or token",
    });
    var form = h("form", { class: "card signin", id: "signin-form", onsubmit: function (event) {
      event.preventDefault();
      sessionStorage.setItem(STORE_KEY, input.value.trim());
      api("GET", "/api/v1/sessions/count").then(function () { route(); }).catch(function (error) {
        sessionStorage.removeItem(STORE_KEY);
        banner(message, error.message);
      });
    } },
      h("h1", {}, "Sign in"),
      h("p", { class: "muted" }, "Paste a secret key. It stays in this tab (sessionStorage) and is sent only as a header. Or open a link from ", h("code", {}, "threadline ui-link"), "."),
      input,
      h("button", { type: "submit", id: "sign-in" }, "Sign in"),
      message
    );
    shell(form);
    input.focus();
  }

  function signOut() {
    sessionStorage.removeItem(STORE_KEY);
    location.hash = "#/";
    route();
  }

  // --- Sessions list --------------------------------------------------------------------------

  function field(label, input) { return h("label", { class: "field" }, h("span", {}, label), input); }

  function listView() {
    var f = state.filters;
    var inputs = {
      "filter[type]": h("input", { id: "f-type", value: f["filter[type]"] || "", placeholder: "chat,agent" }),
      "filter[tags]": h("input", { id: "f-tags", value: f["filter[tags]"] || "", placeholder: "any of: a,b" }),
      "filter[taskIdentifier]": h("input", { id: "f-task", value: f["filter[taskIdentifier]"] || "" }),
      "filter[externalId]": h("input", { id: "f-external", value: f["filter[externalId]"] || "" }),
      "filter[createdAt][period]": h("select", { id: "f-period" },
        ["", "30m", "1h", "12h", "1d", "7d", "2w", "30d"].map(function (p) {
          return h("option", { value: p, selected: (f["filter[createdAt][period]"] || "") === p }, p || "any time");
        })),
      "filter[createdAt][from]": h("input", { id: "f-from", type: "datetime-local", value: f.fromLocal || "" }),
      "filter[createdAt][to]": h("input", { id: "f-to", type: "datetime-local", value: f.toLocal || "" }),
    };
    var statusBoxes = STATUSES.map(function (s) {
      var selected = (f["filter[status]"] || "").split(",").indexOf(s) >= 0;
      return h("label", { class: "check" }, h("input", { type: "checkbox", value: s, class: "f-status", checked: selected }), s);
    });
    var sort = h("select", { id: "sort" }, SORTS.map(function (s) {
      return h("option", { value: s[0], selected: state.sort === s[0] }, s[1]);
    }));
    var size = h("select", { id: "page-size" }, [10, 20, 50, 100].map(function (n) {
      return h("option", { value: n, selected: state.size === n }, n + " per page");
    }));
    var form = h("form", { class: "filters card", id: "filters", onsubmit: function (event) {
      event.preventDefault();
      var next = {};
      Object.keys(inputs).forEach(function (key) {
        var value = inputs[key].value.trim();
        if (!value) return;
        if (key.indexOf("[from]") > 0 || key.indexOf("[to]") > 0) {
          next[key.indexOf("[from]") > 0 ? "fromLocal" : "toLocal"] = value;
          value = new Date(value).toISOString();
        }
        next[key] = value;
      });
      var statuses = statusBoxes.map(function (l) { return l.firstChild; })
        .filter(function (box) { return box.checked; }).map(function (box) { return box.value; });
      if (statuses.length) next["filter[status]"] = statuses.join(",");
      state.filters = next;
      state.sort = sort.value;
      state.size = parseInt(size.value, 10);
      state.cursor = null;
      loadList();
    } },
      field("Type", inputs["filter[type]"]),
      field("Tags", inputs["filter[tags]"]),
      field("Task", inputs["filter[taskIdentifier]"]),
      field("External id", inputs["filter[externalId]"]),
      field("Created within", inputs["filter[createdAt][period]"]),
      field("Created from", inputs["filter[createdAt][from]"]),
      field("Created to", inputs["filter[createdAt][to]"]),
      h("fieldset", { class: "field" }, h("legend", {}, "Status"), statusBoxes),
      field("Sort", sort),
      field("Page", size),
      h("div", { class: "actions" },
        h("button", { type: "submit", id: "apply" }, "Apply"),
        h("button", { type: "button", class: "secondary", onclick: function () {
          state.filters = {}; state.cursor = null; listView();
        } }, "Reset"))
    );
    var auto = h("input", { type: "checkbox", id: "auto-refresh", onchange: function () {
      if (state.refreshTimer) { clearInterval(state.refreshTimer); state.refreshTimer = null; }
      if (auto.checked) state.refreshTimer = setInterval(loadList, 5000);
    } });
    shell([
      form,
      h("section", { class: "card" },
        h("div", { class: "row" },
          h("div", { id: "counts", class: "counts" }),
          h("span", { class: "grow" }),
          h("label", { class: "check" }, auto, "Auto-refresh (5 s)")),
        h("div", { id: "list-message" }),
        h("div", { id: "list" }),
        h("nav", { class: "pager" },
          h("button", { id: "prev-page", class: "secondary", disabled: true }, "← Previous"),
          h("button", { id: "next-page", class: "secondary", disabled: true }, "Next →"))
      ),
    ]);
    loadList();
  }

  function statusBadge(status) { return h("span", { class: "badge " + String(status).toLowerCase() }, status); }

  function loadList() {
    var extra = { sort: state.sort, "page[size]": String(state.size) };
    if (state.cursor) extra["page[" + state.cursor[0] + "]"] = state.cursor[1];
    var message = document.getElementById("list-message");
    Promise.all([api("GET", "/api/v1/sessions?" + listQuery(extra)), api("GET", "/api/v1/sessions/count?" + listQuery())])
      .then(function (results) {
        var page = results[0], counts = results[1].data;
        var list = document.getElementById("list");
        if (!list) return;
        clear(message);
        var source = document.getElementById("source");
        if (source) source.textContent = "list source: " + (page.headers.get("Threadline-List-Source") || "?");
        clear(document.getElementById("counts")).appendChild(h("span", {},
          h("strong", { id: "count-total" }, String(counts.count)), " sessions",
          STATUSES.map(function (s) {
            return [" · ", statusBadge(s), " ", h("span", { id: "count-" + s.toLowerCase() }, String(counts.byStatus[s]))];
          })));
        renderList(list, page.data);
        var prev = document.getElementById("prev-page"), next = document.getElementById("next-page");
        prev.disabled = !page.data.pagination.previous;
        next.disabled = !page.data.pagination.next;
        prev.onclick = function () { state.cursor = ["before", page.data.pagination.previous]; loadList(); };
        next.onclick = function () { state.cursor = ["after", page.data.pagination.next]; loadList(); };
        showLag();
      })
      .catch(function (error) {
        if (error.status === 401) { sessionStorage.removeItem(STORE_KEY); signIn(); return; }
        if (message) banner(message, error.message);
      });
  }

  function renderList(el, data) {
    clear(el);
    if (!data.data.length) { el.appendChild(h("p", { class: "muted", id: "empty" }, "No sessions match.")); return; }
    el.appendChild(h("table", { class: "sessions" },
      h("thead", {}, h("tr", {}, ["Session", "Type", "Status", "External id", "Task", "Tags", "Created", "Last active", "out / in"]
        .map(function (t) { return h("th", {}, t); }))),
      h("tbody", {}, data.data.map(function (s) {
        return h("tr", { class: "session-row", "data-id": s.id },
          h("td", { "data-label": "Session" }, h("a", { href: "#/session/" + encodeURIComponent(s.id) }, s.id)),
          h("td", { "data-label": "Type" }, s.type),
          h("td", { "data-label": "Status" }, statusBadge(s.status)),
          h("td", { "data-label": "External id" }, s.externalId || "—"),
          h("td", { "data-label": "Task" }, s.taskIdentifier || "—"),
          h("td", { "data-label": "Tags" }, s.tags.map(function (t) { return h("span", { class: "tag" }, t); })),
          h("td", { "data-label": "Created" }, fmtTime(s.createdAt)),
          h("td", { "data-label": "Last active" }, fmtTime(s.lastActiveAt)),
          h("td", { "data-label": "out / in" }, s.channels.out.records + " / " + s.channels["in"].records));
      }))));
  }

  // --- Session page ---------------------------------------------------------------------------

  function sessionView(id) {
    var message = h("div", { id: "session-message" });
    var main = shell([h("p", {}, h("a", { href: "#/" }, "← Sessions")), message, h("div", { id: "session" })]);
    api("GET", "/api/v1/sessions/" + encodeURIComponent(id)).then(function (result) {
      renderSession(result.data);
    }).catch(function (error) {
      if (error.status === 401) { sessionStorage.removeItem(STORE_KEY); signIn(); return; }
      banner(message, error.message);
    });
    return main;
  }

  function sessionLink(id) {
    return h("a", { href: "#/session/" + encodeURIComponent(id) }, id);
  }

  function renderSession(s) {
    var el = clear(document.getElementById("session"));
    var message = document.getElementById("session-message");
    var rows = [
      ["id", s.id], ["status", statusBadge(s.status)], ["type", s.type], ["externalId", s.externalId || "—"],
      ["taskIdentifier", s.taskIdentifier || "—"], ["tags", s.tags.join(", ") || "—"],
      ["createdAt", fmtTime(s.createdAt)], ["updatedAt", fmtTime(s.updatedAt)],
      ["lastActiveAt", fmtTime(s.lastActiveAt)], ["expiresAt", fmtTime(s.expiresAt)],
      ["closedAt", fmtTime(s.closedAt)], ["closedReason", s.closedReason || "—"],
      ["forkedFrom", s.forkedFrom
        ? [sessionLink(s.forkedFrom.session), " at out " + s.forkedFrom.outOffset + ", in " + s.forkedFrom.inOffset]
        : "—"],
      ["rootId", s.rootId && s.rootId !== s.id ? sessionLink(s.rootId) : "this session"],
    ];
    var tokenOut = h("div", { id: "token-out" });
    el.appendChild(h("section", { class: "card" },
      h("div", { class: "row" },
        h("h1", { class: "grow" }, "Session"),
        h("button", { id: "mint-token", class: "secondary", onclick: function () {
          if (!confirm("Mint a session token (read and write on this session, valid 1 hour)?")) return;
          api("POST", "/api/v1/sessions/" + encodeURIComponent(s.id) + "/tokens", {})
            .then(function (r) {
              clear(tokenOut).appendChild(h("div", { class: "banner info" },
                "Token (expires " + fmtTime(r.data.expiresAt) + "): ",
                h("textarea", { id: "token-value", readonly: true, rows: 3 }, r.data.token)));
            })
            .catch(function (error) { banner(message, error.message); });
        } }, "Mint token"),
        h("button", { id: "close-session", class: "danger", disabled: s.status === "CLOSED", onclick: function () {
          if (!confirm("Close session " + s.id + "? Both channels close; this cannot be undone.")) return;
          api("POST", "/api/v1/sessions/" + encodeURIComponent(s.id) + "/close", {})
            .then(function (r) { renderSession(r.data); })
            .catch(function (error) { banner(message, error.message); });
        } }, "Close session")),
      tokenOut,
      h("dl", { class: "fields", id: "fields" }, rows.map(function (r) {
        return [h("dt", {}, r[0]), h("dd", { "data-field": r[0] }, r[1])];
      })),
      h("h2", {}, "Metadata"),
      h("pre", { class: "json", id: "metadata" }, JSON.stringify(s.metadata, null, 2)),
      h("h2", {}, "Channels"),
      h("table", { class: "stats" },
        h("thead", {}, h("tr", {}, ["", "records", "bytes", "tail offset", "closed", "first record", "last record"]
          .map(function (t) { return h("th", {}, t); }))),
        h("tbody", {}, ["out", "in"].map(function (io) {
          var c = s.channels[io];
          return h("tr", { id: "stats-" + io }, h("th", {}, io), h("td", {}, c.records), h("td", {}, c.bytes),
            h("td", {}, h("code", {}, c.tailOffset)), h("td", {}, c.closed ? "yes" : "no"),
            h("td", {}, fmtTime(c.firstRecordAt)), h("td", {}, fmtTime(c.lastRecordAt)));
        })))
    ));
    el.appendChild(h("section", { class: "card", id: "transcript-card" }));
    var current = (state.io && state.io.session === s.id) ? state.io.name : "out";
    transcript(s, current);
  }

  // --- Transcript: paged reads, and a live tail over EventSource --------------------------------

  function transcript(session, io) {
    state.io = { session: session.id, name: io };
    if (state.tail) { state.tail.stop(); state.tail = null; }
    var card = clear(document.getElementById("transcript-card"));
    var records = h("ol", { class: "records", id: "records" });
    var status = h("div", { id: "transcript-status", class: "muted" });
    var offsetInput = h("input", { id: "jump-offset", placeholder: "offset or record #", size: 20 });
    var live = h("input", { type: "checkbox", id: "live" });
    var total = session.channels[io].records;
    var tailIndex = indexOf(session.channels[io].tailOffset) || 0;
    var page = { start: 0 };

    function load(start) {
      if (state.tail) { state.tail.stop(); state.tail = null; live.checked = false; }
      start = Math.max(0, Math.min(start, Math.max(0, tailIndex - PAGE_SIZE_RECORDS)));
      page.start = start;
      var path = "/v1/stream/sessions/" + encodeURIComponent(session.id) + "/" + io + "?offset=" + offsetOf(start);
      fetch(path, { headers: { Authorization: "Bearer " + credential() }, cache: "no-store" })
        .then(function (response) {
          if (response.status === 410) {
            // Trimmed: start from the first record still kept.
            return fetch(path.replace(/offset=[^&]+/, "offset=-1"), { headers: { Authorization: "Bearer " + credential() }, cache: "no-store" });
          }
          return response;
        })
        .then(function (response) {
          if (!response.ok) throw new Error("read failed: HTTP " + response.status);
          var next = indexOf(response.headers.get("Stream-Next-Offset"));
          return response.json().then(function (values) { return { values: values, next: next }; });
        })
        .then(function (result) {
          var first = result.next - result.values.length;
          var shown = result.values.slice(0, PAGE_SIZE_RECORDS);
          clear(records);
          shown.forEach(function (value, i) { records.appendChild(recordItem(first + i, value)); });
          records.setAttribute("data-first", String(first));
          status.textContent = shown.length
            ? "records " + first + "–" + (first + shown.length - 1) + " of " + total
            : "no records";
        })
        .catch(function (error) { status.textContent = error.message; });
    }

    card.appendChild(h("div", { class: "row" },
      h("h2", { class: "grow" }, "Transcript"),
      h("div", { class: "tabs", role: "tablist" }, ["out", "in"].map(function (name) {
        return h("button", { id: "tab-" + name, class: name === io ? "tab active" : "tab", role: "tab",
          "aria-selected": name === io ? "true" : "false", onclick: function () { transcript(session, name); } }, name);
      }))));
    card.appendChild(h("div", { class: "row controls" },
      h("button", { id: "first", class: "secondary", onclick: function () { load(0); } }, "First"),
      h("button", { id: "older", class: "secondary", onclick: function () { load(page.start - PAGE_SIZE_RECORDS); } }, "Older"),
      h("button", { id: "newer", class: "secondary", onclick: function () { load(page.start + PAGE_SIZE_RECORDS); } }, "Newer"),
      h("button", { id: "latest", class: "secondary", onclick: function () { load(tailIndex - PAGE_SIZE_RECORDS); } }, "Latest"),
      h("form", { class: "inline", onsubmit: function (event) {
        event.preventDefault();
        var value = offsetInput.value.trim();
        var index = /^\d+$/.test(value) ? parseInt(value, 10) : indexOf(value);
        if (index === null) { status.textContent = "not an offset: " + value; return; }
        load(index);
      } }, offsetInput, h("button", { type: "submit", class: "secondary", id: "jump" }, "Go")),
      h("span", { class: "grow" }),
      h("label", { class: "check" }, live, "Live tail")));
    card.appendChild(h("div", { id: "live-state", class: "live-state", "data-state": "off" }));
    card.appendChild(status);
    card.appendChild(records);
    live.addEventListener("change", function () {
      if (live.checked) state.tail = startTail(session, io, records, status);
      else if (state.tail) { state.tail.stop(); state.tail = null; }
    });
    if (session.channels[io].closed) showClosed();
    load(0);
  }

  function recordItem(index, value) {
    return h("li", { class: "record", "data-index": String(index) },
      h("div", { class: "record-head" }, h("span", {}, "#" + index), h("code", { class: "muted" }, offsetOf(index))),
      h("pre", { class: typeof value === "string" ? "text" : "json" }, pretty(value)));
  }

  function showClosed() {
    var el = document.getElementById("live-state");
    if (!el) return;
    el.setAttribute("data-state", "closed");
    clear(el).appendChild(h("div", { class: "banner closed", id: "closed-banner" }, "Channel closed: no more records will arrive."));
  }

  function setLive(stateName, text) {
    var el = document.getElementById("live-state");
    if (!el || el.getAttribute("data-state") === "closed") return;
    el.setAttribute("data-state", stateName);
    clear(el).appendChild(h("span", { class: "pill " + stateName }, text));
  }

  // EventSource resumes by itself (it sends Last-Event-ID, the offset after the last record it
  // saw). If it gives up (network gone, token expired), start again from that offset with a
  // fresh token. Records at or below the last index shown are skipped, so nothing shows twice.
  function startTail(session, io, records, status) {
    var stopped = false, source = null, retryTimer = null;
    var lastIndex = null; // index of the last record on screen
    var tailOffset = null; // the id of the last record shown: where a fresh connection resumes
    // Start with the last few records already there, then follow.
    var startOffset = offsetOf(Math.max(0, (indexOf(session.channels[io].tailOffset) || 0) - 20));
    clear(records);

    function tokenFor() {
      var cred = credential();
      if (isJwt(cred)) return Promise.resolve(cred); // a ui-link token reads every session
      return api("POST", "/api/v1/sessions/" + encodeURIComponent(session.id) + "/tokens", { scopes: ["read"] })
        .then(function (r) { return r.data.token; });
    }

    function open(fromOffset) {
      setLive("connecting", "connecting…");
      tokenFor().then(function (token) {
        if (stopped) return;
        var q = new URLSearchParams({ offset: fromOffset, timeoutSeconds: String(TAIL_TIMEOUT), token: token });
        source = new EventSource("/realtime/v1/sessions/" + encodeURIComponent(session.id) + "/" + io + "?" + q);
        source.onopen = function () { setLive("live", "live"); };
        source.onmessage = function (event) {
          var index = indexOf(event.lastEventId) - 1;
          if (lastIndex !== null && index <= lastIndex) return; // already shown
          var value;
          try { value = JSON.parse(event.data); } catch (e) { value = event.data; }
          records.appendChild(recordItem(index, value));
          while (records.children.length > LIVE_KEEP) records.removeChild(records.firstChild);
          lastIndex = index;
          tailOffset = event.lastEventId;
          records.setAttribute("data-last", String(index));
          status.textContent = "live: last record #" + index;
          var last = records.lastChild;
          if (last && last.scrollIntoView) last.scrollIntoView({ block: "nearest" });
        };
        source.addEventListener("closed", function () {
          source.close();
          showClosed();
        });
        source.onerror = function () {
          if (source.readyState === EventSource.CLOSED) {
            // 204 at the end of a closed channel, an expired token, or no network.
            if (stopped) return;
            api("PUT", "/realtime/v1/sessions/" + encodeURIComponent(session.id) + "/" + io)
              .then(function (r) {
                if (r.data.closed && (tailOffset || startOffset) >= r.data.tailOffset) { showClosed(); return; }
                retry();
              })
              .catch(retry);
          } else {
            setLive("reconnecting", "reconnecting…");
          }
        };
      }).catch(function (error) { status.textContent = error.message; retry(); });
    }

    function retry() {
      if (stopped) return;
      setLive("reconnecting", "reconnecting…");
      retryTimer = setTimeout(function () { open(tailOffset || startOffset); }, 2000);
    }

    open(startOffset);
    return {
      stop: function () {
        stopped = true;
        if (retryTimer) clearTimeout(retryTimer);
        if (source) source.close();
        setLive("off", "");
      },
    };
  }

  // --- Routing --------------------------------------------------------------------------------

  function route() {
    var hash = location.hash || "#/";
    if (!credential()) { signIn(); return; }
    var match = /^#\/session\/(.+)$/.exec(hash);
    if (match) sessionView(decodeURIComponent(match[1]));
    else listView();
  }

  // A ui-link carries a read-only token in the fragment (never sent to a server): keep it in
  // this tab and take it out of the address bar and history.
  var fragment = new URLSearchParams((location.hash || "").replace(/^#/, ""));
  if (fragment.get("token")) {
    sessionStorage.setItem(STORE_KEY, fragment.get("token"));
    history.replaceState(null, "", location.pathname + location.search + "#/");
  }
  window.addEventListener("hashchange", route);
  route();
})();
