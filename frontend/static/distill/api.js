/* Shared helpers: REST calls with CSRF and JSON errors, safe DOM building, toasts.
   All user text goes through textContent (h()), never innerHTML. */
"use strict";
const Distill = (() => {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status; this.body = body;
    }
  }

  function toLogin() {
    const next = location.pathname + location.search + location.hash;
    location.href = "/login/?next=" + encodeURIComponent(next);
  }

  async function api(path, {method = "GET", body, form, signal} = {}) {
    const opts = {method, headers: {"X-CSRFToken": csrf(), "Accept": "application/json"}, credentials: "same-origin", signal};
    if (form) opts.body = form;
    else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
    const r = await fetch(path, opts);
    if (r.status === 401 || r.status === 403 && !(await r.clone().text()).includes("permission")) {
      // session expired: the caller's drafts are in localStorage; come back here after logging in
      toLogin();
      throw new ApiError(r.status, {message: "session expired"});
    }
    if (r.status === 204) return null;
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = {message: text.slice(0, 200)}; }
    if (!r.ok) throw new ApiError(r.status, data);
    return data;
  }

  /* Upload with progress (fetch has no upload progress): XMLHttpRequest. */
  function upload(path, form, onProgress) {
    return new Promise((resolve, reject) => {
      const x = new XMLHttpRequest();
      x.open("POST", path);
      x.setRequestHeader("X-CSRFToken", csrf());
      x.setRequestHeader("Accept", "application/json");
      x.upload.onprogress = (e) => e.lengthComputable && onProgress && onProgress(e.loaded / e.total);
      x.onload = () => {
        let data = null;
        try { data = JSON.parse(x.responseText); } catch (e) { data = {message: x.responseText.slice(0, 200)}; }
        if (x.status === 401 || x.status === 403) { toLogin(); reject(new ApiError(x.status, data)); }
        else if (x.status >= 400) reject(new ApiError(x.status, data)); else resolve(data);
      };
      x.onerror = () => reject(new ApiError(0, {message: "network error"}));
      x.send(form);
    });
  }

  async function all(path) {
    let out = [], url = path;
    while (url) { const d = await api(url); out = out.concat(d.results || d); url = d.next || null; }
    return out;
  }

  function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class") el.className = v;
      else if (k === "style") el.style.cssText = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
    return el;
  }

  function toast(msg, kind = "info") {
    const t = document.getElementById("toast");
    t.textContent = msg; t.className = "show " + kind;
    clearTimeout(toast._t); toast._t = setTimeout(() => (t.className = ""), kind === "error" ? 6000 : 2500);
  }

  function fail(e) { toast(e.message || String(e), "error"); }

  const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324"];
  function colorOf(categories, id) {
    const i = categories.findIndex((c) => c.id === id);
    return COLORS[(i < 0 ? 0 : i) % COLORS.length];
  }

  function fmtSeconds(s) {
    if (s == null) return "";
    s = Math.round(s); if (s < 60) return s + " s";
    const m = Math.floor(s / 60); if (m < 60) return `${m} min ${s % 60} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  /* An in-page confirmation (never window.confirm: it blocks the page and cannot be styled).
     Resolves true when the user confirms, false on cancel or Esc. */
  function confirmDialog(message, {ok = "OK", cancel = "Cancel", danger = false} = {}) {
    return new Promise((resolve) => {
      const d = h("dialog", {class: "confirm", id: "confirm-dialog", role: "alertdialog"},
        h("p", {}, message),
        h("div", {class: "row end"},
          h("button", {id: "confirm-cancel", onclick: () => d.close("cancel")}, cancel),
          h("button", {id: "confirm-ok", class: danger ? "danger" : "primary", onclick: () => d.close("ok")}, ok)));
      d.addEventListener("close", () => { d.remove(); resolve(d.returnValue === "ok"); });
      document.body.append(d);
      d.showModal();
      d.querySelector("#confirm-ok").focus();
    });
  }

  /* Seconds left for a running job, from its progress and the time since it started. */
  function jobEta(job, now = Date.now()) {
    if (!job || job.state !== "running" || !job.started || !(job.progress > 0.005) || job.progress >= 1) return null;
    const elapsed = (now - new Date(job.started).getTime()) / 1000;
    return elapsed > 0 ? elapsed * (1 - job.progress) / job.progress : null;
  }

  /* What a job's line says: its live message while it runs, never a stale one once it is final. */
  function jobText(job) {
    if (!job) return "";
    if (job.state === "succeeded") {
      const took = job.started && job.finished ? (new Date(job.finished) - new Date(job.started)) / 1000 : null;
      return took != null && took >= 0 ? `done in ${fmtSeconds(took)}` : "done";
    }
    if (job.state === "failed") return "failed";
    if (job.state === "cancelled") return "cancelled";
    if (job.state === "queued") return job.message || "waiting for a worker";
    const left = jobEta(job);
    return [job.message || "running", left != null ? `about ${fmtSeconds(left)} left` : "estimating time left"].join(" · ");
  }

  function progressBar(value, label) {
    return h("div", {class: "progress", role: "progressbar", "aria-valuenow": Math.round(value * 100), "aria-valuemin": 0, "aria-valuemax": 100},
      h("div", {class: "bar", style: `width:${(value * 100).toFixed(1)}%`}), h("span", {}, label || `${Math.round(value * 100)}%`));
  }

  /* Draw instances (boxes, keypoints with skeleton) on a 2D context scaled by s. */
  function drawInstances(ctx, instances, categories, s, {threshold = () => 0, lineWidth = 2, selected = -1, dashed = false, color, unplaced = false} = {}) {
    let drawn = 0;
    ctx.lineWidth = lineWidth;
    ctx.setLineDash(dashed ? [4, 3] : []);
    instances.forEach((d, i) => {
      if (d.score !== undefined && d.score < threshold(d.category_id)) return;
      drawn++;
      const c = color || colorOf(categories, d.category_id);
      const [x, y, w, hh] = d.bbox;
      ctx.strokeStyle = c;
      ctx.lineWidth = i === selected ? lineWidth + 2 : lineWidth;
      ctx.strokeRect(x * s, y * s, w * s, hh * s);
      if (d.keypoints) {
        const cat = categories.find((k) => k.id === d.category_id) || {};
        const kp = d.keypoints;
        ctx.beginPath();
        for (const [a, b] of cat.skeleton || []) {
          const ia = (a - 1) * 3, ib = (b - 1) * 3;
          if (kp[ia + 2] > 0 && kp[ib + 2] > 0) { ctx.moveTo(kp[ia] * s, kp[ia + 1] * s); ctx.lineTo(kp[ib] * s, kp[ib + 1] * s); }
        }
        ctx.stroke();
        ctx.fillStyle = c;
        for (let k = 0; k < kp.length; k += 3) if (kp[k + 2] > 0) ctx.fillRect(kp[k] * s - 2, kp[k + 1] * s - 2, 4, 4);
        // the editor shows keypoints not labeled yet (v = 0) hollow, so they can be dragged into place
        if (unplaced) for (let k = 0; k < kp.length; k += 3) if (kp[k + 2] === 0) ctx.strokeRect(kp[k] * s - 3, kp[k + 1] * s - 3, 6, 6);
      }
    });
    ctx.setLineDash([]);
    return drawn;
  }

  return {api, upload, all, h, toast, fail, colorOf, fmtSeconds, progressBar, drawInstances, ApiError, confirmDialog, jobEta, jobText};
})();
