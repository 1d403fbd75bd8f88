// AIGC Studio: the browser side. Vanilla JS, no build step, no network beyond this server's /v1 API.
//
// Every call goes through api() with the key from localStorage as a Bearer token. Generations are
// recorded by the server; their ids (generation_ids / a stream's last chunk) are what ratings and
// comparisons point at, and what the history lists.
"use strict";

// ---------------------------------------------------------------------------- i18n

const I18N = {
  en: {
    title: "AIGC Studio", "tab.text": "Text", "tab.image": "Image", "tab.music": "Music",
    "tab.history": "History", "tab.compare": "Compare", apikey: "API key (if the server has keys)",
    model: "Model", "prompt.text": "Prompt (empty = unconditional)",
    "prompt.image": "Prompt (text-to-image pipelines only)", generate: "Generate", stop: "Stop",
    params: "Parameters", temperature: "Temperature", max_tokens: "Max tokens", seed: "Seed",
    lock: "lock", randomise: "random", up: "good", down: "bad", steps: "Steps", guidance: "Guidance", label: "Label",
    sampler: "Sampler", count: "Images", key: "Key", meter: "Meter", bars: "Bars",
    instrument: "Instrument", "any.kind": "any kind", "any.rating": "any rating",
    "any.model": "any model", search: "Search prompts and outputs", "search.go": "Search",
    newer: "← Newer", older: "Older →", blind: "blind", "cmp.go": "Two samples",
    restore: "Restore settings", regenerate: "Regenerate exactly", vary: "Vary seed",
    better: "This one is better", rated: "Rated", saved: "Saved", empty: "Nothing recorded yet.",
    generating: "Generating…", done: "Done", "need.key": "The server wants an API key: type it at the top right.",
    "no.models": "No models of this kind on the server.", hidden: "hidden model", winner: "winner",
    "pick.first": "Pick the better one", stars: "stars",
  },
  zh: {
    title: "AIGC 工作室", "tab.text": "文本", "tab.image": "图像", "tab.music": "音乐",
    "tab.history": "历史", "tab.compare": "对比", apikey: "API 密钥（服务器启用密钥时）",
    model: "模型", "prompt.text": "提示词（留空 = 无条件生成）",
    "prompt.image": "提示词（仅文生图管线）", generate: "生成", stop: "停止",
    params: "参数", temperature: "温度", max_tokens: "最大词元数", seed: "种子",
    lock: "锁定", randomise: "随机", up: "好", down: "差", steps: "步数", guidance: "引导强度", label: "类别",
    sampler: "采样器", count: "图像数", key: "调性", meter: "拍号", bars: "小节数",
    instrument: "乐器", "any.kind": "全部类型", "any.rating": "全部评分",
    "any.model": "全部模型", search: "搜索提示词和输出", "search.go": "搜索",
    newer: "← 较新", older: "较旧 →", blind: "盲评", "cmp.go": "生成两个样本",
    restore: "恢复设置", regenerate: "完全重现", vary: "换个种子",
    better: "这个更好", rated: "已评分", saved: "已保存", empty: "还没有记录。",
    generating: "生成中…", done: "完成", "need.key": "服务器需要 API 密钥：请在右上角输入。",
    "no.models": "服务器上没有这类模型。", hidden: "隐藏的模型", winner: "胜出",
    "pick.first": "选出更好的一个", stars: "星",
  },
};
let lang = localStorage.getItem("aigc.lang") || (navigator.language.startsWith("zh") ? "zh" : "en");
const t = (k) => (I18N[lang] && I18N[lang][k]) || I18N.en[k] || k;

function applyLang() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-ph]")) el.placeholder = t(el.dataset.i18nPh);
  $("#lang").textContent = lang === "zh" ? "English" : "中文";
  for (const sel of document.querySelectorAll("select[data-any]")) {
    if (sel.options[0]) sel.options[0].textContent = t("any.model");
  }
}

// ---------------------------------------------------------------------------- helpers

const $ = (s, root = document) => root.querySelector(s);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
};
const randomSeed = () => Math.floor(Math.random() * 2 ** 31);

function say(msg, kind = "info") {
  const s = $("#status");
  s.textContent = msg || "";
  s.className = msg ? kind : "";
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = localStorage.getItem("aigc.key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function raise(r) {
  let msg = r.statusText;
  try { msg = (await r.json()).detail || msg; } catch (e) { /* not JSON */ }
  if (r.status === 401) msg = t("need.key") + " (" + msg + ")";
  throw new ApiError(r.status, msg);
}

// A JSON call to the API; errors become ApiError with the server's one-line detail.
async function api(path, body, opts = {}) {
  const r = await fetch(path.replace(/^\//, ""), {
    method: body === undefined ? "GET" : "POST",
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: opts.signal,
  });
  if (!r.ok) await raise(r);
  return r.json();
}

function showError(e) {
  if (e.name === "AbortError") return say(t("stop"));
  say(e.message || String(e), "error");
}

// A stored output (image PNG, MIDI) as an object URL: fetched with the key, so <img> can show it.
const blobUrls = new Map();
async function outputUrl(ref) {
  if (!blobUrls.has(ref)) {
    const r = await fetch("v1/outputs/" + ref, { headers: headers(false) });
    if (!r.ok) await raise(r);
    blobUrls.set(ref, URL.createObjectURL(await r.blob()));
  }
  return blobUrls.get(ref);
}

// ---------------------------------------------------------------------------- tabs, models

function showTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === "tab-" + name);
  localStorage.setItem("aigc.tab", name);
  if (name === "history") loadHistory();
}

let models = [];
async function loadModels() {
  const list = await api("v1/models");
  models = list.data;
  for (const sel of document.querySelectorAll("select.model-pick")) {
    const keep = sel.value;
    sel.replaceChildren();
    if (sel.dataset.any) sel.append(el("option", { value: "" }, t("any.model")));
    for (const m of models) {
      if (sel.dataset.kind && m.kind !== sel.dataset.kind) continue;
      const versions = (m.versions || []).filter((v) => v !== m.id);
      // history rows name the exact version (name@version): the filter offers only those
      if (!sel.dataset.any || !versions.length) sel.append(el("option", { value: m.id }, m.id));
      for (const v of versions) sel.append(el("option", { value: v }, (sel.dataset.any ? "" : "  ") + v));
    }
    if (keep) sel.value = keep;
  }
  // the B side of a comparison starts on a different model (or version) when there is one
  const b = $("#cmp-model-b");
  if (b.options.length > 1 && b.selectedIndex === 0) b.selectedIndex = 1;
  for (const kind of ["text", "image", "music"]) {
    const sel = $("#" + kind + "-model");
    if (!sel.options.length) sel.append(el("option", { value: "", disabled: true }, t("no.models")));
  }
}

// The music tab exists only when this server has the music route (another build may not).
async function detectMusic() {
  try {
    const spec = await api("openapi.json");
    const has = Object.keys(spec.paths || {}).some((p) => p.includes("/music"));
    $('#tabs [data-tab="music"]').hidden = !has;
  } catch (e) { /* no spec: no music tab */ }
}

// ---------------------------------------------------------------------------- parameters

function params(id) {
  const out = {};
  for (const inp of $("#" + id).querySelectorAll("input, select")) {
    if (inp.type === "checkbox") out[inp.name] = inp.checked;
    else if (inp.type === "number") out[inp.name] = inp.value === "" ? null : Number(inp.value);
    else out[inp.name] = inp.value;
  }
  return out;
}

function setParams(id, values) {
  for (const [k, v] of Object.entries(values)) {
    const inp = $("#" + id).querySelector(`[name="${k}"]`);
    if (!inp || v === undefined) continue;
    if (inp.type === "checkbox") inp.checked = !!v;
    else inp.value = v === null ? "" : v;
  }
}

// The seed for the next call: the locked one, or a fresh random one (shown, so it can be locked).
function nextSeed(id) {
  const p = params(id);
  if (p.seed_lock && p.seed !== null) return p.seed;
  const s = randomSeed();
  setParams(id, { seed: s });
  return s;
}

function saveForm(id) { localStorage.setItem("aigc.form." + id, JSON.stringify(params(id))); }
function loadForm(id) {
  try { setParams(id, JSON.parse(localStorage.getItem("aigc.form." + id) || "{}")); } catch (e) { /* ignore */ }
}

// ---------------------------------------------------------------------------- ratings

// A thumb drawn in SVG: emoji fonts are not everywhere (a headless browser, some Linux desktops).
function thumbIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", "M2 21h4V9H2v12zm20-11a2 2 0 0 0-2-2h-6.3l1-4.6v-.3c0-.4-.2-.8-.4-1.1L13.2 1 6.6 7.6C6.2 8 6 8.5 6 9v10a2 2 0 0 0 2 2h9c.8 0 1.5-.5 1.8-1.2l3-7.1.2-.7v-2z");
  svg.append(path);
  return svg;
}

function ratingWidget(gid, current) {
  const box = el("span", { class: "rating", "data-gid": gid });
  const done = (msg) => { box.dataset.rated = "1"; note.textContent = msg; };
  const note = el("span", { class: "note" }, current ? `${current.toFixed(1)}★` : "");
  const rate = async (value, kind) => {
    try {
      await api("v1/ratings", { generation_id: gid, value, kind });
      done(t("rated") + (kind === "thumb" ? (value > 0 ? " +1" : " −1") : ` ${value}★`));
    } catch (e) { showError(e); }
  };
  box.append(
    el("button", { class: "thumb up", title: t("up"), "aria-label": t("up"), onclick: () => rate(1, "thumb") }, thumbIcon()),
    el("button", { class: "thumb down", title: t("down"), "aria-label": t("down"), onclick: () => rate(-1, "thumb") }, thumbIcon()),
  );
  const stars = el("span", { class: "stars", title: t("stars") });
  const filled = Math.round(current || 0);  // the mean so far; hovering previews a new vote
  for (let i = 1; i <= 5; i++) {
    stars.append(el("button", { class: i <= filled ? "star on" : "star", "data-v": i, onclick: () => rate(i, "stars") }, "★"));
  }
  box.append(stars, note);
  return box;
}

function genActions(row, extra = []) {
  return el("div", { class: "actions" },
    ratingWidget(row.id, row.rating),
    el("button", { class: "restore", "data-i18n": "restore", onclick: () => restore(row) }, t("restore")),
    el("button", { class: "regenerate", "data-i18n": "regenerate", onclick: () => restore(row, "exact") }, t("regenerate")),
    el("button", { class: "vary", "data-i18n": "vary", onclick: () => restore(row, "vary") }, t("vary")),
    ...extra);
}

// ---------------------------------------------------------------------------- text

let textAbort = null;
let textChat = null;  // a restored chat generation's messages: it runs again through the chat route


function textRequest() {
  const p = params("text-params");
  const req = {
    model: $("#text-model").value, prompt: $("#text-prompt").value, max_tokens: p.max_tokens,
    temperature: p.temperature, top_p: p.top_p, top_k: p.top_k, seed: nextSeed("text-params"),
  };
  if (textChat) req.messages = textChat;
  return req;
}

// Read a server-sent events body (fetch + ReadableStream): onEvent(JSON) per "data:" line.
async function readSSE(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {  // one event per blank-line-separated block
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") onEvent(JSON.parse(line.slice(6)));
      }
    }
  }
}

// Stream a completion over SSE (fetch + ReadableStream) into the output box.
async function generateText(req = textRequest()) {
  saveForm("text-params");
  const out = $("#text-output"), meta = $("#text-meta"), actions = $("#text-actions");
  $("#text-result").hidden = false;
  out.textContent = req.prompt;
  out.append(el("span", { class: "gen" }));
  const gen = out.lastChild;
  meta.textContent = t("generating");
  actions.replaceChildren();
  textAbort = new AbortController();
  $("#text-go").disabled = true;
  $("#text-stop").disabled = false;
  say("");
  const t0 = performance.now();
  let gid = null, seed = req.seed, finish = null;
  try {
    const { prompt, ...chat } = req;  // a chat request has messages instead of a prompt
    const r = await fetch(req.messages ? "v1/chat/completions" : "v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify({ ...(req.messages ? chat : req), stream: true }),
      signal: textAbort.signal,
    });
    if (!r.ok) await raise(r);
    await readSSE(r, (chunk) => {
      for (const c of chunk.choices || []) {
        const piece = c.text ?? (c.delta && c.delta.content);
        if (piece) gen.textContent += piece;
        if (c.finish_reason) { finish = c.finish_reason; gid = c.generation_id; seed = c.seed; }
      }
      if (chunk.warnings) say(chunk.warnings.join("; "), "error");
    });
    const dt = ((performance.now() - t0) / 1000).toFixed(2);
    meta.textContent = `#${gid} · ${req.model} · seed ${seed} · ${finish} · ${dt} s`;
    if (gid !== null) {
      const row = { id: gid, kind: "text", model: req.model, prompt: req.prompt, seed,
                    params: { temperature: req.temperature, top_p: req.top_p, top_k: req.top_k,
                              max_new_tokens: req.max_tokens, messages: req.messages } };
      actions.replaceWith(Object.assign(genActions(row), { id: "text-actions" }));
    }
  } catch (e) {
    showError(e);
    meta.textContent = "";
  } finally {
    $("#text-go").disabled = false;
    $("#text-stop").disabled = true;
    textAbort = null;
  }
}

// ---------------------------------------------------------------------------- images

function imageRequest() {
  const p = params("image-params");
  const req = { model: $("#image-model").value, n: p.n || 1, seed: nextSeed("image-params") };
  if ($("#image-prompt").value) req.prompt = $("#image-prompt").value;
  if (p.steps) req.steps = p.steps;
  if (p.guidance !== null) req.guidance = p.guidance;
  if (p.label !== "") req.label = /^\d+$/.test(p.label) ? Number(p.label) : p.label;
  if (p.sampler) req.sampler = p.sampler;
  return req;
}

// Images run as a background job (POST /v1/jobs): each one shows as soon as it is made, from the
// job's SSE events (progress, ETA, preview). Image i of a job has seed + i and is made alone, so
// any one can be made again with n=1. `only`: regenerate image `only` of a direct call, whose
// images share one seed: ask for only+1 images and keep the last.
async function generateImages(req = imageRequest(), only = null) {
  saveForm("image-params");
  const box = $("#image-results");
  const progress = el("p", { class: "muted progress" }, t("generating"));
  box.replaceChildren(progress);
  $("#image-go").disabled = true;
  say("");
  try {
    let items;
    if (only !== null) {
      const res = await api("v1/images/generations", req);
      items = res.data.map((d, i) => ({ ...d, generation_id: res.generation_ids[i] })).slice(only, only + 1);
    } else {
      const job = await api("v1/jobs", { type: "images.generations", input: req });
      const r = await fetch(`v1/jobs/${job.id}/events`, { headers: headers(false) });
      if (!r.ok) await raise(r);
      await readSSE(r, (ev) => {
        const eta = ev.eta_s !== null && ev.eta_s !== undefined ? ` · ETA ${ev.eta_s.toFixed(1)} s` : "";
        progress.textContent = `${t("generating")} ${ev.step}/${ev.total}${eta}`;
        if (ev.preview) box.append(el("img", { class: "preview", src: ev.preview, alt: `${ev.step}/${ev.total}` }));
      });
      const view = await api(`v1/jobs/${job.id}`);
      if (view.status !== "succeeded") throw new Error(view.error || view.status);
      items = view.result.data;
    }
    box.replaceChildren();
    items.forEach((d, i) => {
      const row = { id: d.generation_id, kind: "image", model: req.model, prompt: req.prompt || "",
                    seed: d.seed, params: d.parameters };
      box.append(el("figure", { class: "card" },
        el("img", { src: "data:image/png;base64," + d.b64_json, alt: `seed ${d.seed}` }),
        el("figcaption", {}, `#${row.id} · seed ${d.seed} · ${i + 1}/${items.length}`),
        genActions(row)));
    });
  } catch (e) {
    box.replaceChildren();
    showError(e);
  } finally {
    $("#image-go").disabled = false;
  }
}

// ---------------------------------------------------------------------------- music

async function generateMusic(req = null) {
  const p = params("music-params");
  req = req || { model: $("#music-model").value, key: p.key, meter: p.meter, bars: p.bars,
                 temperature: p.temperature, instrument: p.instrument, seed: nextSeed("music-params"), format: "both" };
  saveForm("music-params");
  const box = $("#music-results");
  box.replaceChildren(el("p", { class: "muted" }, t("generating")));
  try {
    const res = await api("v1/audio/music", req);
    box.replaceChildren();
    res.data.forEach((d, i) => {
      const row = { id: res.generation_ids[i], kind: "music", model: req.model, prompt: "", seed: res.seed,
                    params: res.parameters };
      box.append(el("figure", { class: "card" },
        el("img", { src: "data:image/png;base64," + d.piano_roll_b64, alt: "piano roll" }),
        d.wav_b64 ? el("audio", { controls: true, src: "data:audio/wav;base64," + d.wav_b64 }) : null,
        el("figcaption", {}, `#${row.id} · seed ${res.seed}`),
        ratingWidget(row.id)));
    });
  } catch (e) {
    box.replaceChildren();
    showError(e);
  }
}

// ---------------------------------------------------------------------------- restore / regenerate

// Put a stored generation's settings back in its form; "exact" runs it again with the same seed,
// "vary" with a fresh one.
async function restore(row, mode = null) {
  const p = row.params || {};
  const seed = mode === "vary" ? randomSeed() : row.seed;
  if (row.kind === "text") {
    showTab("text");
    setOption($("#text-model"), row.model);
    $("#text-prompt").value = row.prompt;
    textChat = p.messages || null;
    setParams("text-params", { temperature: p.temperature, top_p: p.top_p, top_k: p.top_k,
                               max_tokens: p.max_new_tokens, seed, seed_lock: true });
    if (mode) return generateText();
  } else if (row.kind === "image") {
    showTab("image");
    setOption($("#image-model"), row.model);
    $("#image-prompt").value = row.prompt || "";
    const index = p.index || 0;
    setParams("image-params", { steps: p.steps, guidance: p.guidance, label: p.label ?? "",
                                sampler: p.sampler || "", n: mode === "exact" ? index + 1 : (p.n || 1), seed, seed_lock: true });
    // the i-th image of a call is the i-th draw of its seed: ask for i+1 images, show the last
    if (mode) return generateImages(imageRequest(), mode === "exact" ? index : null);
  } else if (row.kind === "music") {
    showTab("music");
    setOption($("#music-model"), row.model);
    setParams("music-params", { seed, seed_lock: true });
    if (mode) return generateMusic();
  }
  say(t("restore") + ` #${row.id}`);
}

function setOption(sel, value) {
  if (![...sel.options].some((o) => o.value === value)) sel.append(el("option", { value }, value));
  sel.value = value;
}

// ---------------------------------------------------------------------------- history

const hist = { cursors: [], before: null };

async function loadHistory(before = null) {
  const f = new FormData($("#history-filters"));
  const q = new URLSearchParams({ limit: "12" });
  for (const [k, v] of f.entries()) if (v) q.set(k, v);
  if (before) q.set("before", before);
  const list = $("#history-list");
  try {
    const page = await api("v1/generations?" + q);
    hist.before = before;
    list.replaceChildren();
    if (!page.data.length) list.append(el("p", { class: "muted" }, t("empty")));
    for (const row of page.data) list.append(historyCard(row));
    $("#history-older").disabled = !page.has_more;
    $("#history-older").dataset.cursor = page.last_id || "";
    $("#history-newer").disabled = !hist.cursors.length;
  } catch (e) { showError(e); }
}

function historyCard(row) {
  const when = new Date(row.created * 1000).toLocaleString(lang === "zh" ? "zh-CN" : "en");
  const body = el("div", { class: "body" });
  if (row.output_text !== null) {
    body.append(el("pre", { class: "output" }, el("b", {}, row.prompt), row.output_text));
  } else if (row.output_ref && row.output_ref.endsWith(".png")) {
    const img = el("img", { alt: row.prompt || `#${row.id}` });
    outputUrl(row.output_ref).then((u) => { img.src = u; }).catch(showError);
    body.append(img);
    if (row.prompt) body.append(el("p", {}, row.prompt));
  } else {
    body.append(el("p", {}, row.prompt || "", " ", el("code", {}, row.output_ref || "")));
  }
  const rating = row.rating === null ? "" : ` · ${row.rating.toFixed(1)}★ (${row.rating_count})`;
  return el("article", { class: "card hist", "data-id": row.id },
    el("div", { class: "meta" }, `#${row.id} · ${row.kind} · ${row.model} · seed ${row.seed} · ${when}${rating}`),
    body, genActions(row));
}

// ---------------------------------------------------------------------------- compare

async function compare() {
  const prompt = $("#cmp-prompt").value, blind = $("#cmp-blind").checked;
  const p = params("text-params");
  const sides = [$("#cmp-model-a").value, $("#cmp-model-b").value];
  const box = $("#cmp-pair");
  box.replaceChildren(el("p", { class: "muted" }, t("generating")));
  try {
    // two samples with their own seeds (same model twice gives two different samples)
    const res = await Promise.all(sides.map((model) => api("v1/completions", {
      model, prompt, max_tokens: p.max_tokens, temperature: p.temperature, top_p: p.top_p, top_k: p.top_k,
      seed: randomSeed(),
    })));
    let cards = res.map((r, i) => ({ gid: r.generation_ids[0], text: r.choices[0].text, model: sides[i] }));
    if (blind && Math.random() < 0.5) cards = [cards[1], cards[0]];  // blind: the side says nothing
    box.replaceChildren();
    const [a, b] = cards.map((c) => c.gid);
    cards.forEach((c, i) => {
      const label = blind ? t("hidden") : c.model;
      const pick = el("button", { class: "pick primary", onclick: async () => {
        try {
          await api("v1/comparisons", { a, b, winner: c.gid });
          for (const [j, card] of [...box.children].entries()) {
            card.querySelector(".who").textContent = cards[j].model + (j === i ? ` — ${t("winner")}` : "");
            card.querySelector(".pick").disabled = true;
          }
          say(t("saved"));
        } catch (e) { showError(e); }
      }, "data-i18n": "better" }, t("better"));
      box.append(el("article", { class: "card side", "data-gid": c.gid },
        el("div", { class: "meta" }, `${"AB"[i]} · `, el("span", { class: "who" }, label)),
        el("pre", { class: "output" }, el("b", {}, prompt), c.text), pick));
    });
    say(t("pick.first"));
  } catch (e) {
    box.replaceChildren();
    showError(e);
  }
}

// ---------------------------------------------------------------------------- start

function init() {
  applyLang();
  const key = $("#apikey");
  key.value = localStorage.getItem("aigc.key") || "";
  key.addEventListener("change", () => {
    localStorage.setItem("aigc.key", key.value.trim());
    start();
  });
  $("#lang").addEventListener("click", () => {
    lang = lang === "zh" ? "en" : "zh";
    localStorage.setItem("aigc.lang", lang);
    applyLang();
  });
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  for (const id of ["text-params", "image-params", "music-params"]) {
    loadForm(id);
    $("#" + id + " .randomise").addEventListener("click", () => setParams(id, { seed: randomSeed(), seed_lock: false }));
  }
  $("#text-prompt").value = localStorage.getItem("aigc.prompt") || "";
  $("#text-prompt").addEventListener("input", (e) => {
    textChat = null;  // an edited prompt is a plain completion again
    localStorage.setItem("aigc.prompt", e.target.value);
  });
  $("#text-go").addEventListener("click", () => generateText());
  $("#text-stop").addEventListener("click", () => textAbort && textAbort.abort());
  $("#image-go").addEventListener("click", () => generateImages());
  $("#music-go").addEventListener("click", () => generateMusic());
  $("#cmp-go").addEventListener("click", compare);
  $("#history-filters").addEventListener("submit", (e) => {
    e.preventDefault();
    hist.cursors = [];
    loadHistory();
  });
  $("#history-older").addEventListener("click", (e) => {
    hist.cursors.push(hist.before);
    loadHistory(Number(e.target.dataset.cursor));
  });
  $("#history-newer").addEventListener("click", () => loadHistory(hist.cursors.pop() || null));
  start();
}

async function start() {
  try {
    await loadModels();
    say("");
    await detectMusic();
    const tab = localStorage.getItem("aigc.tab");
    if (tab && !$(`#tabs [data-tab="${tab}"]`).hidden) showTab(tab);
  } catch (e) { showError(e); }
}

document.addEventListener("DOMContentLoaded", init);
