/* Drag-and-drop upload of many images or a zip, with a progress bar and a per-file result list. */
"use strict";
const Uploader = (() => {
  const {api, upload, h, fail, progressBar} = Distill;
  const BATCH = 50;  // files per request: per-file results arrive as each batch finishes

  function resultList(results) {
    return h("ul", {class: "results"}, results.map((r) =>
      h("li", {class: r.status}, h("span", {class: "badge " + r.status}, r.status), " ", r.file_name, r.reason ? ` — ${r.reason}` : "")));
  }

  async function waitJob(id, onUpdate) {
    for (;;) {
      const j = await api(`/api/jobs/${id}/`);
      onUpdate(j);
      if (["succeeded", "failed", "cancelled"].includes(j.state)) return j;
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  async function send(datasetId, files, box, onDone) {
    const status = h("div", {class: "upload-status"});
    box.replaceChildren(status);
    const zips = files.filter((f) => /\.zip$/i.test(f.name));
    const images = files.filter((f) => !/\.zip$/i.test(f.name));
    const all = [];
    const counts = {accepted: 0, duplicate: 0, rejected: 0};
    const summary = () => `${counts.accepted} accepted, ${counts.duplicate} duplicate, ${counts.rejected} rejected`;
    try {
      for (let i = 0; i < images.length; i += BATCH) {
        const form = new FormData();
        images.slice(i, i + BATCH).forEach((f) => form.append("files", f, f.name));
        const r = await upload(`/api/datasets/${datasetId}/upload/`, form, (p) =>
          status.replaceChildren(progressBar((i + p * Math.min(BATCH, images.length - i)) / images.length, `uploading ${i}/${images.length} images`)));
        r.files.forEach((f) => { counts[f.status]++; all.push(f); });
        status.replaceChildren(progressBar(Math.min(i + BATCH, images.length) / images.length, summary()));
      }
      for (const z of zips) {
        const form = new FormData(); form.append("file", z, z.name);
        const job = await upload(`/api/datasets/${datasetId}/upload-zip/`, form, (p) =>
          status.replaceChildren(progressBar(p, `uploading ${z.name}`)));
        const done = await waitJob(job.id, (j) => status.replaceChildren(progressBar(j.progress, `unpacking ${z.name}: ${j.message || j.state}`)));
        if (done.state !== "succeeded") { all.push({file_name: z.name, status: "rejected", reason: done.error || done.state}); counts.rejected++; continue; }
        done.result.files.forEach((f) => { counts[f.status]++; all.push(f); });
        if (done.result.coco) all.push({file_name: "COCO JSON in " + z.name, status: "accepted", reason: `${done.result.coco.annotations} annotations`});
      }
    } catch (e) {
      fail(e);
      all.push({file_name: "(upload)", status: "rejected", reason: e.message});
    }
    box.replaceChildren(h("p", {class: "upload-summary"}, summary()), resultList(all));
    onDone && onDone();
  }

  function attach(zone, datasetId, box, onDone) {
    const input = h("input", {type: "file", multiple: true, accept: "image/*,.zip", style: "display:none",
      onchange: (e) => send(datasetId, [...e.target.files], box, onDone)});
    zone.append(input);
    zone.addEventListener("click", () => input.click());
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault(); zone.classList.remove("over");
      send(datasetId, [...e.dataTransfer.files], box, onDone);
    });
  }
  return {attach, send, waitJob, resultList};
})();
