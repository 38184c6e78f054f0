// Reflex console: hash routes (#live, #model, #user/ID, #item/ID), each page polling the
// JSON API under ./api/ and drawing its charts as inline SVG. No libraries, nothing
// fetched from anywhere but this server.
"use strict";

const main = document.getElementById("main");
const statusLine = document.getElementById("status");
const keyField = document.getElementById("api-key");
let timer = null;
let generation = 0; // bumped on every navigation so stale answers are dropped

// ---- helpers ---------------------------------------------------------------------

// Builds an element; text children become text nodes (never HTML), so ids and titles
// from requests cannot inject markup.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function fmt(n, digits) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (digits !== undefined) return Number(n).toFixed(digits);
  const a = Math.abs(n);
  if (a >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (n / 1e3).toFixed(1) + "k";
  if (a >= 100 || Number.isInteger(n)) return String(Math.round(n));
  if (a >= 1) return n.toFixed(1);
  return n.toPrecision(2);
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function when(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleString([], { hour12: false });
}

function bytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
  return n + " B";
}

async function api(path, options) {
  let response;
  try {
    response = await fetch("api/" + path, options);
  } catch (err) {
    return { ok: false, status: 0, body: { error: "the server does not answer: " + err } };
  }
  let body;
  try {
    body = await response.json();
  } catch (err) {
    body = { error: "the answer was not JSON (HTTP " + response.status + ")" };
  }
  return { ok: response.ok, status: response.status, body };
}

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "muted";
}

function tile(label, value) {
  return h("div", { class: "tile" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}

function userLink(id) {
  return h("a", { href: "#user/" + encodeURIComponent(id) }, id);
}

function itemLink(id) {
  return h("a", { href: "#item/" + encodeURIComponent(id), "data-item-link": id }, id);
}

// ---- charts ----------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function s(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// The smallest 1, 2, 2.5 or 5 times a power of ten at or above `v`, so ticks read well.
function niceTop(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// A line chart of `series` ([{name, points: [[t, v|null], ...]}]) into `host`, as wide
// as the host (so text keeps its size). `opts.max` is the least top of the y axis.
function lineChart(host, series, opts) {
  const W = Math.max(320, Math.round(host.clientWidth) || 560), H = 190, L = 52, R = 10, T = 10, B = 24;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart" });
  let t0 = Infinity, t1 = -Infinity, top = 0;
  for (const sr of series) {
    for (const [t, v] of sr.points) {
      t0 = Math.min(t0, t); t1 = Math.max(t1, t);
      if (v !== null && v !== undefined) top = Math.max(top, v);
    }
  }
  if (!Number.isFinite(t0)) {
    const now = Date.now();
    t0 = now - 60000; t1 = now;
  }
  if (t1 - t0 < 10000) t0 = t1 - 10000;
  if (opts.max !== undefined) top = Math.max(opts.max, top);
  top = top > 0 ? niceTop(top * 1.05) : 1;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    svg.append(s("text", { class: "tick", x: L - 6, y: y(v) + 3, "text-anchor": "end" }, fmt(v)));
  }
  svg.append(s("text", { class: "tick", x: L, y: H - 6 }, clock(t0)));
  svg.append(s("text", { class: "tick", x: W - R, y: H - 6, "text-anchor": "end" }, clock(t1)));
  series.forEach((sr, i) => {
    // A null value breaks the line (an interval without observations).
    let run = [];
    const flush = () => {
      // A lone point shows as a short dash.
      if (run.length === 1) run = [[run[0][0] - 2, run[0][1]], [run[0][0] + 2, run[0][1]]];
      if (run.length > 1) {
        const points = run.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" ");
        svg.append(s("polyline", { class: "s" + (sr.color ?? i), points }));
      }
      run = [];
    };
    for (const [t, v] of sr.points) {
      if (v === null || v === undefined) flush();
      else run.push([x(t), y(v)]);
    }
    flush();
  });
  const legend = h("div", { class: "legend" },
    series.map((sr, i) => h("span", {}, h("i", { class: "s" + (sr.color ?? i) }), sr.name)));
  host.replaceChildren(svg, legend);
}

function chartPanel(title) {
  const host = h("div", { class: "chart" });
  return { panel: h("div", { class: "panel" }, h("h2", {}, title), host), host };
}

// ---- pages -----------------------------------------------------------------------

const pages = {
  live: { every: 1000, render: renderLive },
  model: { every: 2000, render: renderModel },
  user: { every: 1000, render: renderUser },
  item: { every: 5000, render: renderItem },
};

function renderLive() {
  const tiles = h("div", { class: "tiles" });
  const events = chartPanel("Events per second, by status");
  const latency = chartPanel("Recommend latency (ms)");
  const freshness = chartPanel("Freshness: event time to applied (ms)");
  main.replaceChildren(h("h1", {}, "Live"), tiles, h("div", { class: "grid" }, events.panel, latency.panel, freshness.panel));
  return async () => {
    const r = await api("live");
    if (!r.ok) throw new Error(r.body.error);
    const d = r.body;
    const last = d.points[d.points.length - 1];
    tiles.replaceChildren(
      tile("Model", d.model_version ?? "starting"),
      tile("Items", fmt(d.items)),
      tile("Profiles", fmt(d.profiles)),
      tile("Accepted (total)", fmt(d.totals.accepted)),
      tile("Accepted / s", fmt(last ? last.events[0] : 0)),
      tile("Open streams", fmt(d.open_streams)),
    );
    lineChart(events.host, d.statuses.map((name, i) => ({ name, points: d.points.map((p) => [p.t, p.events[i]]) })), {});
    const lat = (key, field) => d.points.map((p) => [p.t, p[key] ? p[key][field] : null]);
    lineChart(latency.host, [
      { name: "p50", points: lat("recommend", "p50_ms"), color: 4 },
      { name: "p99", points: lat("recommend", "p99_ms"), color: 2 },
      { name: "mean", points: lat("recommend", "mean_ms"), color: 0 },
    ], {});
    lineChart(freshness.host, [
      { name: "p50", points: lat("freshness", "p50_ms"), color: 4 },
      { name: "p99", points: lat("freshness", "p99_ms"), color: 2 },
    ], {});
  };
}

function renderModel() {
  const tiles = h("div", { class: "tiles" });
  const quality = chartPanel("Prequential quality (decayed): all users and the holdout");
  const message = h("div", {});
  const versions = h("div", { class: "panel" });
  main.replaceChildren(h("h1", {}, "Model"), tiles, quality.panel, message, versions);
  let needsKey = false;
  const rollback = async (id) => {
    if (!window.confirm(`Roll the model back to version ${id}?`)) return;
    const headers = { "content-type": "application/json" };
    if (keyField.value) headers["x-api-key"] = keyField.value;
    const r = await api("rollback", { method: "POST", headers, body: JSON.stringify({ version: id }) });
    message.replaceChildren(r.ok
      ? h("div", { class: "message" }, `Rolled back: now serving ${r.body.serving} (version ${r.body.version.id}).`)
      : h("div", { class: "message error" }, `Rollback refused (HTTP ${r.status}): ${r.body.error}`));
  };
  return async () => {
    const r = await api("model");
    if (!r.ok) throw new Error(r.body.error);
    const d = r.body, q = d.quality;
    needsKey = d.rollback_needs_key;
    tiles.replaceChildren(
      tile("Serving", d.serving),
      tile("Scored events", fmt(q.all.scored)),
      tile("hr@10 all", fmt(q.all.decayed.hr10, 3)),
      tile("hr@10 holdout", fmt(q.holdout.decayed.hr10, 3)),
      tile("Baseline hr@10", q.baseline ? `${fmt(q.baseline.hr10, 3)} (v${q.baseline.version})` : "–"),
      tile("Auto rollback", q.armed ? `armed (below ${q.below_for})` : "not armed"),
    );
    const pts = (f) => d.history.map((p) => [p.t, p[f]]);
    lineChart(quality.host, [
      { name: "hr@10 all", points: pts("all_hr10"), color: 4 },
      { name: "hr@10 holdout", points: pts("holdout_hr10"), color: 1 },
      { name: "recall@20 all", points: pts("all_recall20"), color: 0 },
      { name: "recall@20 holdout", points: pts("holdout_recall20"), color: 3 },
    ], {});
    const fig = (v, pop, f) => (v.quality ? fmt(v.quality[pop][f], 3) : "–");
    versions.replaceChildren(
      h("h2", {}, `Versions (${d.versions.length})`),
      h("p", { class: "muted" }, needsKey
        ? "Rolling back needs an API key with the admin scope (field at the top right)."
        : "API keys are off on this server: anyone who reaches the console can roll back."),
      h("table", { id: "versions" },
        h("tr", {}, ["id", "taken", "reason", "by", "events", "items", "size", "hr@10 all", "hr@10 holdout", "recall@20 all", ""].map((c) => h("th", {}, c))),
        d.versions.slice().reverse().map((v) => h("tr", { "data-version": v.id },
          h("td", {}, v.id), h("td", {}, when(v.created_ms)), h("td", {}, v.reason), h("td", {}, v.taken_by),
          h("td", { class: "num" }, fmt(v.events)), h("td", { class: "num" }, fmt(v.items)), h("td", { class: "num" }, bytes(v.bytes)),
          h("td", { class: "num" }, fig(v, "all", "hr10")), h("td", { class: "num" }, fig(v, "holdout", "hr10")),
          h("td", { class: "num" }, fig(v, "all", "recall20"), v.quality && v.quality.degraded ? h("span", { class: "badge bad" }, "degraded") : null),
          h("td", {}, h("button", { class: "rollback", onclick: () => rollback(v.id) }, "Roll back"))))),
    );
  };
}

function idForm(kind, placeholder) {
  const form = h("form", { class: "go" }, h("input", { name: "id", placeholder }), h("button", {}, "Open"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const id = form.elements.id.value.trim();
    if (id) location.hash = `${kind}/${encodeURIComponent(id)}`;
  });
  return form;
}

function renderUser(id) {
  if (!id) {
    main.replaceChildren(h("h1", {}, "User"), h("p", { class: "muted" }, "Which user? Their profile, recent interactions and current recommendations refresh as their events arrive."), idForm("user", "user id"));
    return null;
  }
  const badge = h("span", { class: "muted", id: "user-version" });
  const recs = h("div", { class: "panel" });
  const profile = h("div", { class: "panel" });
  const recent = h("div", { class: "panel" });
  main.replaceChildren(h("h1", {}, "User ", h("code", {}, id), " ", badge), h("div", { class: "grid" }, recs, h("div", {}, profile, recent)));
  let previous = null;
  return async () => {
    const r = await api("users/" + encodeURIComponent(id) + "?count=10");
    if (!r.ok) throw new Error(r.body.error);
    const d = r.body, rec = d.recommendations, p = d.profile;
    badge.textContent = p ? `profile v${p.version} · updated ${clock(Date.now())}` : `no profile yet · ${clock(Date.now())}`;
    const top = Math.max(1e-9, ...rec.items.map((i) => Math.abs(i.score)));
    const before = previous;
    previous = new Set(rec.items.map((i) => i.item_id));
    recs.replaceChildren(
      h("h2", {}, "Recommendations"),
      h("p", { class: "muted" }, `model ${rec.model_version}${rec.cached ? " · cached" : ""}${rec.degraded ? " · degraded (profile unavailable)" : ""}`),
      h("table", { id: "recs", "data-profile-version": rec.profile_version },
        h("tr", {}, h("th", { class: "num" }, "#"), h("th", {}, "item"), h("th", {}, "title"), h("th", {}, "source"), h("th", { class: "num" }, "score")),
        rec.items.map((it, n) => {
          const bar = h("span", { class: "bar" });
          bar.style.width = Math.round((40 * Math.abs(it.score)) / top) + "px";
          return h("tr", { "data-item": it.item_id, class: before && !before.has(it.item_id) ? "new" : null },
            h("td", { class: "num" }, n + 1), h("td", {}, itemLink(it.item_id)), h("td", {}, it.title ?? ""),
            h("td", {}, h("span", { class: "badge " + it.source }, it.source)),
            h("td", { class: "num" }, fmt(it.score, 3), bar));
        })),
    );
    if (!p) {
      profile.replaceChildren(h("h2", {}, "Profile"), h("p", { class: "muted" }, "No events from this user yet: the recommendations are what a newcomer gets."));
      recent.replaceChildren();
      return;
    }
    profile.replaceChildren(
      h("h2", {}, "Profile"),
      h("dl", { class: "kv" },
        h("dt", {}, "version"), h("dd", {}, p.version),
        h("dt", {}, "last seen"), h("dd", {}, when(p.last_seen_ms)),
        h("dt", {}, "events"), h("dd", {}, Object.entries(p.counts).map(([k, n]) => `${k} ${n}`).join(" · ") || "–"),
        h("dt", {}, "session"), h("dd", {}, p.session ? `${p.session.session_id}: ${p.session.events} events since ${clock(p.session.started_ms)}` : "–"),
        h("dt", {}, "purchased"), h("dd", {}, p.purchased.length ? p.purchased.flatMap((i, n) => (n ? [", ", itemLink(i)] : [itemLink(i)])) : "–")),
    );
    recent.replaceChildren(
      h("h2", {}, `Recent interactions (${p.recent.length})`),
      h("table", { id: "recent" },
        h("tr", {}, h("th", {}, "time"), h("th", {}, "kind"), h("th", {}, "item")),
        p.recent.slice(0, 20).map((i) => h("tr", {}, h("td", {}, clock(i.timestamp_ms)), h("td", {}, i.kind), h("td", {}, itemLink(i.item_id))))),
    );
  };
}

function renderItem(id) {
  if (!id) {
    main.replaceChildren(h("h1", {}, "Item"), h("p", { class: "muted" }, "Which item? Its catalog entry and the items nearest to it."), idForm("item", "item id"));
    return null;
  }
  const entry = h("div", { class: "panel" });
  const similar = h("div", { class: "panel" });
  main.replaceChildren(h("h1", {}, "Item ", h("code", {}, id)), h("div", { class: "grid" }, entry, similar));
  return async () => {
    const r = await api("items/" + encodeURIComponent(id) + "?count=10");
    if (!r.ok) throw new Error(r.body.error);
    const d = r.body, c = d.catalog;
    entry.replaceChildren(h("h2", {}, "Catalog entry"), c
      ? h("dl", { class: "kv", id: "catalog" },
        h("dt", {}, "title"), h("dd", {}, c.title || "–"),
        h("dt", {}, "categories"), h("dd", {}, c.categories.join(", ") || "–"),
        h("dt", {}, "available"), h("dd", {}, c.available ? "yes" : "no"),
        h("dt", {}, "embedding"), h("dd", {}, c.embedding_dim ? `${c.embedding_dim} values` : "none"))
      : h("p", { class: "muted" }, "Not in the catalog (known from events only)."));
    similar.replaceChildren(h("h2", {}, "Similar items"), d.similar.length
      ? h("table", { id: "similar" },
        h("tr", {}, h("th", {}, "item"), h("th", {}, "title"), h("th", {}, "source"), h("th", { class: "num" }, "score")),
        d.similar.map((it) => h("tr", { "data-item": it.item_id },
          h("td", {}, itemLink(it.item_id)), h("td", {}, it.title ?? ""),
          h("td", {}, h("span", { class: "badge " + it.source }, it.source)), h("td", { class: "num" }, fmt(it.score, 3)))))
      : h("p", { class: "muted" }, d.similar_note || "No similar items yet."));
  };
}

// ---- routing ---------------------------------------------------------------------

function route() {
  let hash = location.hash.replace(/^#\/?/, "");
  try {
    hash = decodeURIComponent(hash);
  } catch (err) {
    // A malformed escape: use the hash as it is.
  }
  const slash = hash.indexOf("/");
  const name = slash < 0 ? hash : hash.slice(0, slash);
  const id = slash < 0 ? "" : hash.slice(slash + 1);
  return pages[name] ? { name, id } : { name: "live", id: "" };
}

function show() {
  const { name, id } = route();
  const mine = ++generation;
  if (timer) clearTimeout(timer);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === name);
  document.body.dataset.page = name;
  const page = pages[name];
  const refresh = page.render(id);
  if (!refresh) {
    setStatus("");
    return;
  }
  const tick = async () => {
    try {
      await refresh();
      if (mine !== generation) return;
      setStatus(`updated ${clock(Date.now())} · refreshes every ${page.every / 1000} s`);
      document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
    } catch (err) {
      if (mine !== generation) return;
      setStatus(String(err.message || err), true);
    }
    if (mine === generation) timer = setTimeout(tick, page.every);
  };
  tick();
}

for (const [formId, kind] of [["go-user", "user"], ["go-item", "item"]]) {
  const form = document.getElementById(formId);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const id = form.elements.id.value.trim();
    if (id) location.hash = `${kind}/${encodeURIComponent(id)}`;
  });
}
keyField.value = sessionStorage.getItem("reflex-api-key") || "";
keyField.addEventListener("change", () => sessionStorage.setItem("reflex-api-key", keyField.value));
window.addEventListener("hashchange", show);
show();
