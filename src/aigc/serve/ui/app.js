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
    "tab.history": "History", "tab.compare": "Compare", apikey: "API key", "apikey.long": "API key (if the server has keys)",
    prompt: "Prompt", kind: "Kind", rating: "Rating",
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
    generating: "Generating…", done: "Done", "mod.withheld": "Withheld by moderation", "mod.flagged": "Flagged by moderation", "need.key": "The server wants an API key: type it at the top right.",
    "no.models": "No models of this kind on the server.", hidden: "hidden model", winner: "winner",
    "pick.first": "Pick the better one", stars: "stars",
    // regenerate with feedback
    "fb.comment": "What was wrong? (saved with a thumbs-down)", "fb.go": "Regenerate with feedback",
    "fb.before": "Before", "fb.after": "After: best of {k} by {scorer}", "fb.sent": "Thumbs-down saved; regenerating…",
    "fb.fallback": "no scorer on this server, ranked by likelihood",
    // presets, model page, training, win rate
    "tab.models": "Models", "tab.train": "Train", preset: "Preset", "preset.none": "saved presets…",
    "preset.apply": "Apply", "preset.delete": "Delete", "preset.save": "Save", "preset.name": "preset name",
    "preset.saved": "Preset saved", "preset.applied": "Preset applied", "preset.deleted": "Preset deleted",
    "mp.loss": "Loss curve", "mp.train": "train loss", "mp.val": "validation loss", "mp.metrics": "Last metrics",
    "mp.eval": "Evaluation report", "mp.card": "Model card", "mp.config": "Config", "mp.none": "none",
    "mp.versions": "Versions", "mp.nocurve": "no loss points recorded", "mp.metric": "metric",
    "mp.model": "model", "mp.real": "real data", "mp.baseline": "baseline",
    "tr.data": "Data set", "tr.family": "Family", "tr.preset": "Preset", "tr.name": "Name",
    "tr.time": "Time budget (s)", "tr.steps": "Max steps (optional)",
    "tr.set": "Overrides, one per line (e.g. train.lr=3e-3)", "tr.go": "Start training", "tr.cancel": "Cancel",
    "tr.open": "Open the model page", "tr.jobs": "Your training jobs",
    "tr.nodata": "No prepared data sets: run `aigc data prepare SOURCE --out ~/.aigc/data/NAME` (or start the server with --data-dir).",
    "tr.started": "Training started", "tr.step": "step", "tr.loss": "loss", "tr.val": "val", "tr.eta": "ETA",
    "tr.done": "Trained: the model is in the pickers as", "tr.failed": "Training failed:", "tr.cancelled": "Training cancelled",
    "st.queued": "queued", "st.running": "running", "st.succeeded": "succeeded", "st.failed": "failed", "st.cancelled": "cancelled",
    "cmp.stats": "{a} vs {b}: {a} won {w} of {n} — win rate {r} (95% CI {lo}–{hi})",
    "cmp.nostats": "{a} vs {b}: no comparisons yet",
    // result lines, stop / failure, form checks, history, compare
    stopped: "Stopped", "stopped.after": "Stopped after {n} tokens", failed: "Failed: {e}",
    "m.seed": "seed", "m.score": "score", "fin.stop": "stop", "fin.length": "length",
    "fin.content_filter": "content_filter", "kind.text": "text", "kind.image": "image", "kind.music": "music",
    "ph.default": "default", "ph.class": "class", "scorer.logprob": "logprob", "scorer.sentiment": "sentiment",
    "scorer.label": "classifier", "tr.chart": "training loss", "tr.lossat": "(at step {s})", nomatch: "No matches.",
    "bad.int": "{field}: enter a whole number {range}", "bad.num": "{field}: enter a number {range}",
    "range.both": "from {min} to {max}", "range.min": "of at least {min}", "range.max": "of at most {max}",
    "bad.seed": "{field}: enter a whole number of at least 0, or untick “lock”",
    "cmp.same": "same model on both sides: the samples differ only by seed ({a} and {b})",
  },
  zh: {
    title: "AIGC 工作室", "tab.text": "文本", "tab.image": "图像", "tab.music": "音乐",
    "tab.history": "历史", "tab.compare": "对比", apikey: "API 密钥", "apikey.long": "API 密钥（服务器启用密钥时）",
    prompt: "提示词", kind: "类型", rating: "评分",
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
    generating: "生成中…", done: "完成", "mod.withheld": "内容审核：已拦截", "mod.flagged": "内容审核：已标记", "need.key": "服务器需要 API 密钥：请在右上角输入。",
    "no.models": "服务器上没有这类模型。", hidden: "隐藏的模型", winner: "胜出",
    "pick.first": "选出更好的一个", stars: "星",
    "fb.comment": "哪里不好？（随差评一起保存）", "fb.go": "按反馈重新生成",
    "fb.before": "之前", "fb.after": "之后：{k} 选 1，评分器 {scorer}", "fb.sent": "差评已保存，正在重新生成…",
    "fb.fallback": "服务器没有评分器，按似然排序",
    "tab.models": "模型", "tab.train": "训练", preset: "预设", "preset.none": "已保存的预设…",
    "preset.apply": "应用", "preset.delete": "删除", "preset.save": "保存", "preset.name": "预设名称",
    "preset.saved": "预设已保存", "preset.applied": "预设已应用", "preset.deleted": "预设已删除",
    "mp.loss": "损失曲线", "mp.train": "训练损失", "mp.val": "验证损失", "mp.metrics": "最新指标",
    "mp.eval": "评估报告", "mp.card": "模型卡", "mp.config": "配置", "mp.none": "无",
    "mp.versions": "版本", "mp.nocurve": "没有记录损失数据", "mp.metric": "指标",
    "mp.model": "模型", "mp.real": "真实数据", "mp.baseline": "基线",
    "tr.data": "数据集", "tr.family": "模型族", "tr.preset": "预设", "tr.name": "名称",
    "tr.time": "时间预算（秒）", "tr.steps": "最大步数（可选）",
    "tr.set": "覆盖配置，每行一项（如 train.lr=3e-3）", "tr.go": "开始训练", "tr.cancel": "取消",
    "tr.open": "打开模型页", "tr.jobs": "你的训练任务",
    "tr.nodata": "没有预处理好的数据集：运行 `aigc data prepare 源 --out ~/.aigc/data/名称`（或用 --data-dir 启动服务器）。",
    "tr.started": "训练已开始", "tr.step": "步", "tr.loss": "损失", "tr.val": "验证", "tr.eta": "预计剩余",
    "tr.done": "训练完成，模型已出现在选择框中：", "tr.failed": "训练失败：", "tr.cancelled": "训练已取消",
    "st.queued": "排队中", "st.running": "运行中", "st.succeeded": "成功", "st.failed": "失败", "st.cancelled": "已取消",
    "cmp.stats": "{a} 对 {b}：{n} 次比较中 {a} 胜 {w} 次，胜率 {r}（95% 置信区间 {lo}–{hi}）",
    "cmp.nostats": "{a} 对 {b}：还没有比较",
    stopped: "已停止", "stopped.after": "生成 {n} 个词元后停止", failed: "失败：{e}",
    "m.seed": "种子", "m.score": "得分", "fin.stop": "自然结束", "fin.length": "达到长度上限",
    "fin.content_filter": "已被内容过滤", "kind.text": "文本", "kind.image": "图像", "kind.music": "音乐",
    "ph.default": "默认", "ph.class": "类别", "scorer.logprob": "对数概率", "scorer.sentiment": "情感分类器",
    "scorer.label": "分类器", "tr.chart": "训练损失", "tr.lossat": "（第 {s} 步）", nomatch: "没有匹配的记录。",
    "bad.int": "{field}：请输入{range}的整数", "bad.num": "{field}：请输入{range}的数字",
    "range.both": " {min} 到 {max} 之间", "range.min": "不小于 {min} ", "range.max": "不大于 {max} ",
    "bad.seed": "{field}：请输入不小于 0 的整数，或取消“锁定”",
    "cmp.same": "两边是同一个模型：两个样本只有种子不同（{a} 和 {b}）",
  },
};
let lang = localStorage.getItem("aigc.lang") || (navigator.language.startsWith("zh") ? "zh" : "en");
const t = (k) => (I18N[lang] && I18N[lang][k]) || I18N.en[k] || k;
// a message with {named} holes: tf("cmp.stats", {a: "x", ...})
const tf = (k, vars) => t(k).replace(/\{(\w+)\}/g, (m, name) => (name in vars ? vars[name] : m));

// An element's text in the current language: its key, or a message with vars (a var {"t": key} is a
// translated word itself, e.g. a scorer's kind).
function i18nText(e) {
  if (!e.dataset.i18nVars) return t(e.dataset.i18n);
  const vars = JSON.parse(e.dataset.i18nVars);
  for (const [k, v] of Object.entries(vars)) if (v && v.t) vars[k] = t(v.t) === v.t ? v.f : t(v.t);
  return tf(e.dataset.i18n, vars);
}

function applyLang() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = i18nText(el);
  for (const el of document.querySelectorAll("[data-i18n-ph]")) el.placeholder = t(el.dataset.i18nPh);
  for (const el of document.querySelectorAll("[data-i18n-aria]")) el.setAttribute("aria-label", t(el.dataset.i18nAria));
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
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
// a translated word or message inside built text: re-translated when the language changes
const tx = (key, vars = null) => {
  const e = el("span", { "data-i18n": key, "data-i18n-vars": vars ? JSON.stringify(vars) : null });
  e.textContent = i18nText(e);
  return e;
};
// a disabled button stays disabled while it has nothing to act on (no model, no data set)
const busy = (btn, on) => { btn.disabled = on || btn.dataset.blocked === "1"; };

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
  if (e.name === "AbortError") return say(t("stopped"));
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
  for (const b of document.querySelectorAll("#tabs button")) {
    const on = b.dataset.tab === name;
    b.classList.toggle("active", on);
    b.setAttribute("aria-selected", String(on));
    b.tabIndex = on ? 0 : -1;  // one tab stop for the tab list; arrow keys move within it
  }
  for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === "tab-" + name);
  localStorage.setItem("aigc.tab", name);
  say("");  // the status line speaks of the tab it was said on
  if (name === "history") loadHistory();
  if (name === "models") loadDetails($("#mp-model").value);
  if (name === "train") loadTrain();
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
  // a kind with no model: the picker says so and its buttons are off (no request to be refused)
  for (const kind of ["text", "image", "music"]) {
    const sel = $("#" + kind + "-model"), none = !sel.options.length;
    if (none) sel.append(el("option", { value: "", disabled: true, "data-i18n": "no.models" }, t("no.models")));
    for (const id of kind === "text" ? ["#text-go", "#cmp-go"] : ["#" + kind + "-go"]) {
      const was = $(id).dataset.blocked === "1";
      $(id).dataset.blocked = none ? "1" : "";
      if (none || was) busy($(id), false);  // (a running request keeps its button off)
    }
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
  for (const inp of $("#" + id).querySelectorAll("input[name], select[name]")) {
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

// The form's own limits (min, max, whole numbers) checked before any request: one message naming
// the field and what it takes, the field focused; false when something is wrong.
function checkInputs(inputs) {
  for (const inp of inputs) {
    if (inp.type !== "number") continue;
    const v = inp.validity, whole = !inp.step || inp.step === "1";
    const lock = inp.name === "seed" && inp.closest(".seed").querySelector("[name=seed_lock]").checked;
    const bad = v.badInput || v.rangeUnderflow || v.rangeOverflow || (whole && v.stepMismatch) || (lock && inp.value === "");
    inp.toggleAttribute("aria-invalid", bad);
    if (!bad) continue;
    const field = (inp.closest("label") ? inp.closest("label").textContent : inp.name).trim();
    const range = inp.min && inp.max ? tf("range.both", { min: inp.min, max: inp.max })
      : inp.min ? tf("range.min", { min: inp.min }) : inp.max ? tf("range.max", { max: inp.max }) : "";
    say(inp.name === "seed" ? tf("bad.seed", { field }) : tf(whole ? "bad.int" : "bad.num", { field, range }), "error");
    inp.focus();
    return false;
  }
  return true;
}
const checkForm = (id) => checkInputs($("#" + id).querySelectorAll("input"));

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

function ratingWidget(gid, current, mine, count) {
  // The rating controls of one generation: thumbs and 1-5 stars show the caller's own choice (a
  // thumb pressed, stars lit up to the value), the note the generation's mean and count ("4.5★ (2)").
  // `mine` is the caller's own rating ({stars, thumb}: a /v1/generations row's my_rating); without it
  // the stars show the mean until the first click. Rating again replaces one's earlier rating of that
  // kind (the server keeps one per caller and kind), so a click just moves the choice.
  const box = el("span", { class: "rating", "data-gid": gid });
  const summary = (mean, n) => (typeof mean === "number" ? `${mean.toFixed(1)}★` + (n ? ` (${n})` : "") : "");
  const note = el("span", { class: "note" }, summary(current, count));
  const paint = (kind, value) => {
    for (const b of box.querySelectorAll(kind === "thumb" ? ".thumb" : ".star")) {
      const v = Number(b.dataset.v);
      b.setAttribute("aria-pressed", v === value ? "true" : "false");
      if (kind === "stars") b.classList.toggle("on", typeof value === "number" && v <= value);
      else b.firstChild.style.fill = v === value ? "var(--accent)" : "";  // CSSOM: allowed by the CSP
    }
  };
  const rate = async (value, kind) => {
    try {
      const r = await api("v1/ratings", { generation_id: gid, value, kind });
      box.dataset.rated = "1";
      paint(kind, value);
      const said = kind === "thumb" ? (value > 0 ? "+1" : "−1") : `${value}★`;
      const mean = summary(r.rating, r.rating_count);
      note.textContent = `${t("rated")} ${said}` + (mean ? ` · ${mean}` : "");
    } catch (e) { showError(e); }
  };
  box.append(
    el("button", { class: "thumb up", "data-v": 1, title: t("up"), "aria-label": t("up"), onclick: () => rate(1, "thumb") }, thumbIcon()),
    el("button", { class: "thumb down", "data-v": -1, title: t("down"), "aria-label": t("down"), onclick: () => rate(-1, "thumb") }, thumbIcon()),
  );
  const stars = el("span", { class: "stars", title: t("stars") });
  const filled = mine ? 0 : Math.round(current || 0);  // no own rating known: the mean so far
  for (let i = 1; i <= 5; i++) {
    stars.append(el("button", { class: i <= filled ? "star on" : "star", "data-v": i, onclick: () => rate(i, "stars") }, "★"));
  }
  box.append(stars, note);
  if (mine) {
    paint("thumb", mine.thumb);
    paint("stars", mine.stars);
  }
  return box;
}

function genActions(row, extra = []) {
  return el("div", { class: "actions" },
    ratingWidget(row.id, row.rating, row.my_rating, row.rating_count),
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
async function generateText(req = null) {
  if (!req && !checkForm("text-params")) return;
  req = req || textRequest();
  saveForm("text-params");
  const out = $("#text-output"), meta = $("#text-meta"), actions = $("#text-actions");
  feedbackReset();  // the feedback box only ever speaks of the result shown, which this replaces
  $("#text-result").hidden = false;
  out.textContent = req.prompt;
  out.append(el("span", { class: "gen" }));
  const gen = out.lastChild;
  meta.textContent = t("generating");
  actions.replaceChildren();
  textAbort = new AbortController();
  busy($("#text-go"), true);
  $("#text-stop").disabled = false;
  say("");
  const t0 = performance.now();
  let gid = null, seed = req.seed, finish = null, mod = null, pieces = 0;
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
        if (piece) { gen.textContent += piece; pieces++; }  // a stream sends one chunk per token
        if (c.finish_reason) { finish = c.finish_reason; gid = c.generation_id; seed = c.seed; }
        if (c.moderation) mod = c.moderation;
      }
      if (chunk.warnings) say(chunk.warnings.join("; "), "error");
    });
    const dt = ((performance.now() - t0) / 1000).toFixed(2);
    meta.replaceChildren(`#${gid} · ${req.model} · `, tx("m.seed"), ` ${seed} · `, tx("fin." + finish), ` · ${dt} s`);
    // the server withholds a blocked output (finish_reason content_filter) and marks a flagged one
    const cats = mod && mod.categories && mod.categories.length ? `: ${mod.categories.join(", ")}` : "";
    if (finish === "content_filter") say(t("mod.withheld") + cats, "error");
    else if (mod && mod.action === "flag") say(t("mod.flagged") + cats);
    if (gid !== null) {
      const row = { id: gid, kind: "text", model: req.model, prompt: req.prompt, seed,
                    params: { temperature: req.temperature, top_p: req.top_p, top_k: req.top_k,
                              max_new_tokens: req.max_tokens, messages: req.messages } };
      actions.replaceWith(Object.assign(genActions(row), { id: "text-actions" }));
      if (!req.messages) feedbackReady(req, gid, gen.textContent);
    }
  } catch (e) {
    showError(e);
    // the card says what happened to it: stopped after so many tokens, or the error
    meta.replaceChildren(e.name === "AbortError" ? tx("stopped.after", { n: pieces }) : tx("failed", { e: e.message || String(e) }));
  } finally {
    busy($("#text-go"), false);
    $("#text-stop").disabled = true;
    textAbort = null;
  }
}

// ---------------------------------------------------------------------------- regenerate with feedback

// A text result can be thumbed down with a comment; the studio then asks for a new completion of
// the same prompt with a new seed and best_of=4 ranked by the server's default scorer
// (aigc_scorer "default"; by likelihood when the server has none), and shows it next to the old one.
let feedbackFor = 0;  // which shown result the feedback box belongs to (bumped when it is replaced)

function feedbackReset() {
  feedbackFor++;
  $("#text-feedback").hidden = true;
  $("#fb-comment").value = "";
  $("#fb-pair").replaceChildren();
  $("#fb-go").onclick = null;
  $("#fb-go").disabled = false;
}

function feedbackReady(req, gid, text) {
  feedbackReset();
  $("#text-feedback").hidden = false;
  $("#fb-go").onclick = () => regenerateWithFeedback(req, gid, text);
}

// Is there a default scorer for best_of here? Asked once per key (GET /v1/scorers), not found out
// from a 400; an older server without that route gets the old way: try it, fall back on the 400.
let hasScorer = null;
async function defaultScorer() {
  if (hasScorer === null) {
    try { hasScorer = (await api("v1/scorers")).data.some((x) => x.id === "default"); } catch (e) { return true; }
  }
  return hasScorer;
}

async function regenerateWithFeedback(req, gid, oldText) {
  const go = $("#fb-go"), mine = feedbackFor;
  if (go.disabled) return;
  go.disabled = true;
  let ok = false;
  try {
    const comment = $("#fb-comment").value.trim() || null;
    await api("v1/ratings", { generation_id: gid, value: -1, kind: "thumb", comment });
    say(t("fb.sent"));
    const body = { model: req.model, prompt: req.prompt, max_tokens: req.max_tokens, temperature: req.temperature,
                   top_p: req.top_p, top_k: req.top_k, seed: randomSeed(), best_of: 4, aigc_scorer: "default" };
    let out, fallback = false;
    const plain = () => { fallback = true; const { aigc_scorer, ...rest } = body; return rest; };
    try {
      // no usable scorer: OpenAI's rule, mean log-prob
      out = await api("v1/completions", (await defaultScorer()) ? body : plain());
    } catch (e) {
      if (fallback || !(e instanceof ApiError && e.status === 400 && /scorer/.test(e.message))) throw e;
      out = await api("v1/completions", plain());
    }
    if (mine !== feedbackFor) return;  // another result is shown by now: this one is not its pair
    const c = out.choices[0], newGid = out.generation_ids[0];
    const scorer = (out.parameters.scorer || "logprob").split(":")[0];  // its kind, not a server path
    const side = (title, text, extra) => el("div", { class: "side card" },
      el("div", { class: "who" }, title), el("pre", { class: "output" }, text), extra);
    const title = [tx("fb.after", { k: body.best_of, scorer: { t: "scorer." + scorer, f: scorer } })];
    if (fallback) title.push(" (", tx("fb.fallback"), ")");
    $("#fb-pair").replaceChildren(
      side(tx("fb.before"), req.prompt + oldText, el("div", { class: "meta" }, `#${gid} · −1`)),
      Object.assign(side(title, req.prompt + c.text,
        el("div", { class: "meta" }, `#${newGid} · `, tx("m.seed"), ` ${c.seed} · `, tx("m.score"), ` ${Number(c.score).toFixed(3)}`)),
        { id: "fb-new" }),
    );
    $("#fb-new").append(ratingWidget(newGid));
    say("");
    ok = true;  // the thumbs-down is saved and its pair shown: once per result
  } catch (e) { showError(e); } finally { if (mine === feedbackFor) go.disabled = ok; }
}

// ---------------------------------------------------------------------------- images

function imageRequest() {
  const p = params("image-params");
  const req = { model: $("#image-model").value, n: p.n ?? 1, seed: nextSeed("image-params") };
  if ($("#image-prompt").value) req.prompt = $("#image-prompt").value;
  if (p.steps !== null) req.steps = p.steps;
  if (p.guidance !== null) req.guidance = p.guidance;
  if (p.label !== "") req.label = /^\d+$/.test(p.label) ? Number(p.label) : p.label;
  if (p.sampler) req.sampler = p.sampler;
  return req;
}

// Images run as a background job (POST /v1/jobs): each one shows as soon as it is made, from the
// job's SSE events (progress, ETA, preview). Image i of a job (or of a direct call) has seed + i,
// so any one can be made again with n=1, its seed and its label.
async function generateImages(req = null) {
  if (!req && !checkForm("image-params")) return;
  req = req || imageRequest();
  saveForm("image-params");
  const box = $("#image-results");
  const progress = el("p", { class: "muted progress" }, tx("generating"));
  box.replaceChildren(progress);
  busy($("#image-go"), true);
  say("");
  try {
    const job = await api("v1/jobs", { type: "images.generations", input: req });
    const r = await fetch(`v1/jobs/${job.id}/events`, { headers: headers(false) });
    if (!r.ok) await raise(r);
    await readSSE(r, (ev) => {
      const eta = ev.eta_s !== null && ev.eta_s !== undefined ? [" · ", tx("tr.eta"), ` ${ev.eta_s.toFixed(1)} s`] : [];
      progress.replaceChildren(tx("generating"), ` ${ev.step}/${ev.total}`, ...eta);
      if (ev.preview) box.append(el("img", { class: "preview", src: ev.preview, alt: `${ev.step}/${ev.total}` }));
    });
    const view = await api(`v1/jobs/${job.id}`);
    if (view.status !== "succeeded") throw new Error(view.error || view.status);
    const items = view.result.data;
    box.replaceChildren();
    items.forEach((d, i) => {
      const row = { id: d.generation_id, kind: "image", model: req.model, prompt: req.prompt || "",
                    seed: d.seed, params: d.parameters };
      box.append(el("figure", { class: "card" },
        el("img", { src: "data:image/png;base64," + d.b64_json, alt: `seed ${d.seed}` }),
        el("figcaption", {}, `#${row.id} · `, tx("m.seed"), ` ${d.seed} · ${i + 1}/${items.length}`),
        genActions(row)));
    });
  } catch (e) {
    box.replaceChildren();
    showError(e);
  } finally {
    busy($("#image-go"), false);
  }
}

// ---------------------------------------------------------------------------- music

async function generateMusic(req = null) {
  if (!req && !checkForm("music-params")) return;
  const p = params("music-params");
  req = req || { model: $("#music-model").value, key: p.key, meter: p.meter, bars: p.bars,
                 temperature: p.temperature, instrument: p.instrument, seed: nextSeed("music-params"), format: "both" };
  saveForm("music-params");
  const box = $("#music-results");
  box.replaceChildren(el("p", { class: "muted" }, tx("generating")));
  busy($("#music-go"), true);
  try {
    const res = await api("v1/audio/music", req);
    box.replaceChildren();
    res.data.forEach((d, i) => {
      const row = { id: res.generation_ids[i], kind: "music", model: req.model, prompt: "", seed: res.seed,
                    params: res.parameters };
      box.append(el("figure", { class: "card" },
        el("img", { src: "data:image/png;base64," + d.piano_roll_b64, alt: "piano roll" }),
        d.wav_b64 ? el("audio", { controls: true, src: "data:audio/wav;base64," + d.wav_b64 }) : null,
        el("figcaption", {}, `#${row.id} · `, tx("m.seed"), ` ${res.seed}`),
        ratingWidget(row.id)));
    });
  } catch (e) {
    box.replaceChildren();
    showError(e);
  } finally {
    busy($("#music-go"), false);
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
    setParams("image-params", { steps: p.steps, guidance: p.guidance, label: p.label ?? "",
                                sampler: p.sampler || "", n: mode === "exact" ? 1 : (p.n || 1), seed, seed_lock: true });
    // image i of a call has its own seed (seed + i) and label: n=1 with them makes it again
    if (mode) return generateImages();
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
    const filtered = [...f.values()].some((v) => v);
    if (!page.data.length) list.append(el("p", { class: "muted" }, tx(filtered ? "nomatch" : "empty")));
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
    el("div", { class: "meta" }, `#${row.id} · `, tx("kind." + row.kind), ` · ${row.model} · `, tx("m.seed"), ` ${row.seed} · ${when}${rating}`),
    body, genActions(row));
}

// ---------------------------------------------------------------------------- compare

// the version a model id is served by now (`story` -> `story@2`): two ids with one root are one model
const rootOf = (id) => (models.find((m) => m.id === id) || {}).root || id;

async function compare() {
  const go = $("#cmp-go");
  if (go.disabled || !checkForm("text-params")) return;
  const prompt = $("#cmp-prompt").value, blind = $("#cmp-blind").checked;
  const p = params("text-params");
  const sides = [$("#cmp-model-a").value, $("#cmp-model-b").value];
  const box = $("#cmp-pair");
  box.replaceChildren(el("p", { class: "muted" }, tx("generating")));
  busy(go, true);
  say("");
  try {
    // one prompt, one seed, two models (or versions): the models are the only difference. The same
    // model on both sides gets seeds seed and seed + 1: one seed would give the same text twice
    const seed = randomSeed(), same = rootOf(sides[0]) === rootOf(sides[1]);
    const seeds = [seed, same ? seed + 1 : seed];
    const res = await Promise.all(sides.map((model, i) => api("v1/completions", {
      model, prompt, max_tokens: p.max_tokens, temperature: p.temperature, top_p: p.top_p, top_k: p.top_k, seed: seeds[i],
    })));
    let cards = res.map((r, i) => ({ gid: r.generation_ids[0], text: r.choices[0].text, model: sides[i], seed: seeds[i] }));
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
          loadStats();
        } catch (e) { showError(e); }
      }, "data-i18n": "better" }, t("better"));
      box.append(el("article", { class: "card side", "data-gid": c.gid, "data-seed": c.seed },
        el("div", { class: "meta" }, `${"AB"[i]} · `, el("span", { class: "who" }, label), " · ", tx("m.seed"), ` ${c.seed}`),
        el("pre", { class: "output" }, el("b", {}, prompt), c.text), pick));
    });
    say(t("pick.first") + (same ? " — " + tf("cmp.same", { a: seeds[0], b: seeds[1] }) : ""));
  } catch (e) {
    box.replaceChildren();
    showError(e);
  } finally {
    busy(go, false);
  }
}

// ---------------------------------------------------------------------------- win rate

// The running win rate of A against B (server-side: GET /v1/comparisons/stats, Wilson interval).
async function loadStats() {
  const a = $("#cmp-model-a").value, b = $("#cmp-model-b").value, box = $("#cmp-stats");
  box.textContent = "";
  if (!a || !b || a === b) return;
  try {
    const s = await api("v1/comparisons/stats?" + new URLSearchParams({ a, b }));
    const pct = (x) => (100 * x).toFixed(0) + "%";
    box.textContent = s.n
      ? tf("cmp.stats", { a: s.a, b: s.b, w: s.wins, n: s.n, r: pct(s.win_rate), lo: pct(s.ci_low), hi: pct(s.ci_high) })
      : tf("cmp.nostats", { a: s.a, b: s.b });
    box.dataset.n = s.n;
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------------------- presets

// Each parameters box gets a preset bar: saved settings live on the server, per API key.
const PRESET_TABS = { "text-params": "text", "image-params": "image", "music-params": "music" };
let presets = [];

function presetBar(id) {
  const kind = PRESET_TABS[id];
  const pick = el("select", { class: "preset-pick", "aria-label": t("preset"), "data-i18n-aria": "preset" });
  const name = el("input", { type: "text", class: "preset-name", maxlength: "64", "data-i18n-ph": "preset.name",
                             placeholder: t("preset.name"), "aria-label": t("preset.name"), "data-i18n-aria": "preset.name" });
  const chosen = () => presets.find((p) => String(p.id) === pick.value);
  const apply = async () => {
    const p = chosen();
    if (!p) return;
    setParams(id, p.params);
    saveForm(id);
    name.value = p.name;
    say(t("preset.applied") + ": " + p.name);
  };
  const save = async () => {
    const label = name.value.trim() || (chosen() && chosen().name);
    if (!label) return name.focus();
    try {
      const p = await api("v1/presets", { kind, name: label, params: params(id) });
      await loadPresets(p.id, kind);
      say(t("preset.saved") + ": " + p.name);
    } catch (e) { showError(e); }
  };
  const remove = async () => {
    const p = chosen();
    if (!p) return;
    try {
      const r = await fetch("v1/presets/" + p.id, { method: "DELETE", headers: headers(false) });
      if (!r.ok) await raise(r);
      await loadPresets();
      say(t("preset.deleted") + ": " + p.name);
    } catch (e) { showError(e); }
  };
  pick.addEventListener("change", apply);
  return el("div", { class: "presets-box" },
    el("div", { class: "presets" }, pick,
      el("button", { type: "button", class: "preset-apply", "data-i18n": "preset.apply", onclick: apply }, t("preset.apply")),
      el("button", { type: "button", class: "preset-delete", "data-i18n": "preset.delete", onclick: remove }, t("preset.delete"))),
    el("div", { class: "presets" }, name,
      el("button", { type: "button", class: "preset-save", "data-i18n": "preset.save", onclick: save }, t("preset.save"))));
}

async function loadPresets(select = null, selectKind = null) {
  try { presets = (await api("v1/presets")).data; } catch (e) { return showError(e); }
  for (const [id, kind] of Object.entries(PRESET_TABS)) {
    const pick = $("#" + id + " .preset-pick");
    const keep = selectKind === kind && select !== null ? String(select) : pick.value;
    pick.replaceChildren(el("option", { value: "", "data-i18n": "preset.none" }, t("preset.none")));
    for (const p of presets.filter((q) => q.kind === kind)) pick.append(el("option", { value: p.id }, p.name));
    pick.value = [...pick.options].some((o) => o.value === keep) ? keep : "";
  }
}

// ---------------------------------------------------------------------------- charts

// Loss curves on a <canvas>, no library: series = [{points: [[step, value], ...], color}].
function drawChart(canvas, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 240;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.documentElement);
  const muted = css.getPropertyValue("--muted").trim() || "#888";
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = muted;
  const pts = series.flatMap((s) => s.points);
  canvas.dataset.points = pts.length;  // what the chart holds (tests and screen readers)
  if (!pts.length) {
    g.fillText(t("mp.nocurve"), 12, h / 2);
    return;
  }
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of pts) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const L = 48, R = 10, T = 10, B = 22;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (w - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (h - T - B);
  // axes with their end values
  g.strokeStyle = muted;
  g.lineWidth = 1;
  g.beginPath(); g.moveTo(L, T); g.lineTo(L, h - B); g.lineTo(w - R, h - B); g.stroke();
  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3));
  g.fillText(fmt(y1), 4, T + 8);
  g.fillText(fmt(y0), 4, h - B);
  g.fillText(String(x0), L, h - 6);
  g.textAlign = "right";
  g.fillText(String(x1), w - R, h - 6);
  g.textAlign = "left";
  for (const s of series) {
    if (!s.points.length) continue;
    g.strokeStyle = g.fillStyle = s.color;
    g.lineWidth = 1.5;
    g.beginPath();
    s.points.forEach(([x, y], i) => (i ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y))));
    g.stroke();
    if (s.points.length < 30) for (const [x, y] of s.points) g.fillRect(X(x) - 2, Y(y) - 2, 4, 4);
  }
}

const lossSeries = (train, evals) => {
  const accent = getComputedStyle(document.documentElement).getPropertyValue("--accent").trim() || "#3f6ad8";
  return [{ points: train, color: accent }, { points: evals, color: "#e07b00" }];
};

// ---------------------------------------------------------------------------- model page

function kvTable(rows, head = null) {
  const table = el("table");
  if (head) table.append(el("tr", {}, head.map((h) => el("th", {}, h))));
  for (const r of rows) table.append(el("tr", {}, el("th", {}, r[0]), r.slice(1).map((v) => el("td", {}, fmtValue(v)))));
  return table;
}
const fmtValue = (v) => (v === undefined || v === null ? "–" : typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v));

// card.md as minimal markdown, built with textContent only: a card can never inject markup, and
// nothing in it is fetched (an image link shows as its alt text).
function renderCard(md) {
  const box = document.createDocumentFragment();
  let list = null, code = null, table = null;
  const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  for (let line of md.split("\n")) {
    if (line.startsWith("```")) {
      if (code) { box.append(code); code = null; } else code = el("pre");
      continue;
    }
    if (code) { code.textContent += line + "\n"; continue; }
    line = line.replace(/!\[([^\]]*)\]\([^)]*\)/g, "$1");
    if (line.trim().startsWith("|")) {  // a pipe table: the first row is its head, |---| rows are rules
      const row = cells(line);
      if (row.every((c) => /^:?-+:?$/.test(c))) continue;
      if (!table) { table = el("table"); box.append(el("div", { class: "kv" }, table)); }
      table.append(el("tr", {}, row.map((c) => el(table.rows.length ? "td" : "th", {}, c))));
      continue;
    }
    table = null;
    const item = line.match(/^\s*[-*] (.*)/);
    if (item) {
      if (!list) { list = el("ul"); box.append(list); }
      list.append(el("li", {}, item[1]));
      continue;
    }
    list = null;
    const head = line.match(/^(#{1,6}) (.*)/);
    if (head) box.append(el(head[1].length <= 2 ? "h4" : "h5", {}, head[2]));
    else if (line.trim()) box.append(el("p", {}, line));
  }
  if (code) box.append(code);
  return box;
}

let detailsCall = 0;
async function loadDetails(id) {
  if (!id) return;
  const mine = ++detailsCall;
  try {
    const d = await api("v1/models/" + encodeURIComponent(id) + "/details");
    if (mine !== detailsCall) return;  // another model was picked meanwhile
    $("#mp-body").hidden = false;
    $("#mp-meta").textContent = `${d.id} · ${d.kind}${d.family ? " · " + d.family : ""} · ` +
      new Date(d.created * 1000).toLocaleString(lang === "zh" ? "zh-CN" : "en");
    $("#mp-versions").replaceChildren(el("span", { class: "muted", "data-i18n": "mp.versions" }, t("mp.versions")),
      ...d.versions.map((v) => el("button", { class: v === d.id ? "primary" : "", onclick: () => { setOption($("#mp-model"), v); loadDetails(v); } }, v)));
    drawChart($("#mp-chart"), lossSeries(d.metrics.train, d.metrics.eval));
    const last = { ...d.metrics.last_train, ...d.metrics.last_eval };
    delete last.kind;
    $("#mp-metrics").replaceChildren(Object.keys(last).length ? kvTable(Object.entries(last)) : t("mp.none"));
    const ev = d.eval_report;
    if (ev) {
      const sides = ["model", "real", "baseline"].filter((k) => ev[k]);
      const keys = [...new Set(sides.flatMap((k) => Object.keys(ev[k])))];
      $("#mp-eval").replaceChildren(
        el("p", { class: "meta" }, `${ev.kind} · n = ${ev.samples ?? "–"}${ev.warnings.length ? " · " + ev.warnings.join("; ") : ""}`),
        kvTable(keys.map((k) => [k, ...sides.map((s) => ev[s][k])]), [t("mp.metric"), ...sides.map((s) => t("mp." + s))]));
    } else $("#mp-eval").replaceChildren(t("mp.none"));
    $("#mp-card").replaceChildren(d.card ? renderCard(d.card) : t("mp.none"));
    const cfg = d.config || {};
    $("#mp-config").replaceChildren(cfg.model ? kvTable(["model", "train", "data"].map((k) => [k,
      Object.entries(cfg[k] || {}).map(([a, b]) => `${a}=${b}`).join(" · ")])) : t("mp.none"));
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------------------- training

let datasets = [];
const train = { job: null, points: [], evals: [], abort: null };

async function loadTrain() {
  try {
    datasets = (await api("v1/datasets")).data;
    const sel = $("#tr-data"), keep = sel.value;
    sel.replaceChildren(...datasets.map((d) => el("option", { value: d.id }, `${d.id} (`, tx("kind." + d.kind), ")")));
    if (keep) sel.value = keep;
    // nothing to train on: say so here and keep Start off (no request for the server to refuse)
    $("#tr-go").dataset.blocked = datasets.length ? "" : "1";
    if (!train.abort) busy($("#tr-go"), false);
    if (!datasets.length) $("#tr-status").replaceChildren(tx("tr.nodata"));
    else if ($("#tr-status [data-i18n='tr.nodata']")) $("#tr-status").replaceChildren();
    fillFamilies();
    const jobs = (await api("v1/train?limit=10")).data;
    showJobs(jobs);
    const live = jobs.find((j) => j.status === "queued" || j.status === "running");
    if (live && !train.abort) watchJob(live.id);
  } catch (e) { showError(e); }
}

function fillFamilies() {
  const d = datasets.find((x) => x.id === $("#tr-data").value);
  const fam = $("#tr-family"), keep = fam.value;
  fam.replaceChildren(...Object.keys(d ? d.families : {}).map((f) => el("option", { value: f }, f)));
  if ([...fam.options].some((o) => o.value === keep)) fam.value = keep;
  fillPresets();
}

function fillPresets() {
  const d = datasets.find((x) => x.id === $("#tr-data").value);
  const names = (d && d.families[$("#tr-family").value]) || [];
  const sel = $("#tr-preset"), keep = sel.value;
  sel.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  if (names.includes(keep)) sel.value = keep;
}

function showJobs(jobs) {
  const st = (s) => t("st." + s);
  $("#tr-jobs").replaceChildren(jobs.length ? kvTable(jobs.map((j) => [j.id, `${j.name} · ${j.family} · ${j.data}`,
    st(j.status) + (j.model ? " → " + j.model : "") + (j.error ? ": " + j.error : ""),
    j.loss === null ? "" : `${t("tr.loss")} ${j.loss.toFixed(3)}`])) : t("mp.none"));
}

async function startTraining() {
  const go = $("#tr-go");
  if (go.disabled || !checkInputs([$("#tr-time"), $("#tr-steps")])) return;
  const steps = $("#tr-steps").value, time = $("#tr-time").value;
  const body = { family: $("#tr-family").value, data: $("#tr-data").value, name: $("#tr-name").value.trim(),
                 preset: $("#tr-preset").value,
                 set: $("#tr-set").value.split("\n").map((s) => s.trim()).filter(Boolean) };
  if (steps) body.max_steps = Number(steps);
  if (time) body.max_time = Number(time);
  busy(go, true);
  try {
    const job = await api("v1/train", body);
    say(t("tr.started") + ": " + job.id);
    watchJob(job.id);
  } catch (e) {
    showError(e);
    busy(go, false);
  }
}

// Follow a job's SSE stream: each event carries its state and the loss points since the last one.
async function watchJob(id) {
  train.job = id;
  train.points = [];
  train.evals = [];
  train.abort = new AbortController();
  busy($("#tr-go"), true);
  $("#tr-cancel").disabled = false;
  $("#tr-open").hidden = true;
  let last = null;
  try {
    const r = await fetch(`v1/train/${id}/events`, { headers: headers(false), signal: train.abort.signal });
    if (!r.ok) await raise(r);
    await readSSE(r, (ev) => {
      last = ev;
      train.points.push(...(ev.points || []));
      train.evals.push(...(ev.evals || []));
      const of = ev.total_steps ? "/" + ev.total_steps : "";
      const eta = ev.eta_s !== null && ev.eta_s !== undefined ? ` · ${t("tr.eta")} ${ev.eta_s.toFixed(0)} s` : "";
      // train rows come every log_interval steps: the last loss may be older than the last step
      const at = train.points.length ? train.points[train.points.length - 1][0] : ev.step;
      $("#tr-status").textContent = `${ev.id} · ${t("st." + ev.status)} · ${t("tr.step")} ${ev.step}${of}` +
        (ev.loss !== null ? ` · ${t("tr.loss")} ${ev.loss.toFixed(4)}` + (at !== ev.step ? " " + tf("tr.lossat", { s: at }) : "") : "") +
        (ev.val_loss !== null ? ` · ${t("tr.val")} ${ev.val_loss.toFixed(4)}` : "") + eta;
      drawChart($("#tr-chart"), lossSeries(train.points, train.evals));
    });
    if (last && last.status === "succeeded") {
      await loadModels();
      say(`${t("tr.done")} ${last.model}`);
      $("#tr-open").hidden = false;
      $("#tr-open").dataset.model = last.model;
    } else if (last && last.status === "failed") say(`${t("tr.failed")} ${last.error}`, "error");
    else if (last && last.status === "cancelled") say(t("tr.cancelled"));
  } catch (e) { showError(e); }
  finally {
    train.abort = null;
    busy($("#tr-go"), false);
    $("#tr-cancel").disabled = true;
    try { showJobs((await api("v1/train?limit=10")).data); } catch (e) { /* the status line says enough */ }
  }
}

async function cancelTraining() {
  if (!train.job) return;
  try { await api(`v1/train/${train.job}/cancel`, {}); } catch (e) { showError(e); }
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
  $("#tabs").addEventListener("keydown", (e) => {  // the tab list's arrow keys (WAI-ARIA tabs)
    const tabs = [...document.querySelectorAll("#tabs button:not([hidden])")];
    const i = tabs.indexOf(document.activeElement);
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (i < 0 || to === undefined) return;
    e.preventDefault();
    const next = tabs[(to + tabs.length) % tabs.length];
    next.focus();
    showTab(next.dataset.tab);
  });
  // Ctrl/Cmd+Enter sends a prompt box (Enter alone is a new line); Enter sends the one-line image prompt
  const submitOn = (input, button, run, needMod) => $(input).addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.isComposing || (needMod && !(e.ctrlKey || e.metaKey))) return;
    e.preventDefault();
    if (!$(button).disabled) run();
  });
  submitOn("#text-prompt", "#text-go", () => generateText(), true);
  submitOn("#cmp-prompt", "#cmp-go", () => compare(), true);
  submitOn("#image-prompt", "#image-go", () => generateImages(), false);
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
  for (const side of ["#cmp-model-a", "#cmp-model-b"]) $(side).addEventListener("change", loadStats);
  for (const id of Object.keys(PRESET_TABS)) $("#" + id + " legend").after(presetBar(id));
  $("#mp-model").addEventListener("change", (e) => loadDetails(e.target.value));
  $("#tr-data").addEventListener("change", fillFamilies);
  $("#tr-family").addEventListener("change", fillPresets);
  $("#tr-go").addEventListener("click", startTraining);
  $("#tr-cancel").addEventListener("click", cancelTraining);
  $("#tr-open").addEventListener("click", (e) => {
    setOption($("#mp-model"), e.target.dataset.model);
    showTab("models");  // loads the picked model's page
  });
  $("#history-filters").addEventListener("submit", (e) => {
    e.preventDefault();
    hist.cursors = [];
    loadHistory();
  });
  for (const sel of document.querySelectorAll("#history-filters select")) {
    sel.addEventListener("change", () => { hist.cursors = []; loadHistory(); });  // a pick applies at once
  }
  $("#history-older").addEventListener("click", (e) => {
    hist.cursors.push(hist.before);
    loadHistory(Number(e.target.dataset.cursor));
  });
  $("#history-newer").addEventListener("click", () => loadHistory(hist.cursors.pop() || null));
  start();
}

async function start() {
  hasScorer = null;  // another key may be another server's view
  try {
    await loadModels();
    say("");
    loadPresets();
    loadStats();
    await detectMusic();
    const tab = localStorage.getItem("aigc.tab");
    if (tab && !$(`#tabs [data-tab="${tab}"]`).hidden) showTab(tab);
  } catch (e) { showError(e); }
}

document.addEventListener("DOMContentLoaded", init);
