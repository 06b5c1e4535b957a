"""Which views should vote on a keypoint? Measured on the validation set, boxes held fixed.

The ensembled boxes come from the teacher's box views (--box-scales x flip, as inference makes
them). Then every candidate view (--scales x flip) runs the keypoint head on those same boxes, and
each variant, a set of views whose heatmap logits are averaged (Detectron's HM_AVG), decodes its
own keypoints. The boxes and their scores are the same in every variant, so the OKS AP read
against the validation set's own labels differs only by where the keypoints land: over the whole
ensembled output, and over the set the paper's automatic threshold keeps (what a student would be
taught). The unlabeled split's truth is never used.

Run: python benchmarks/keypoint_views.py --teacher runs/kp/teacher.pt --data data/kp [--scales 64,72,80,88,96,112,128,160]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ml_core import ensemble, pipeline, selection
from ml_core.data import load_coco, load_image
from ml_core.evaluation import COCOEvaluator, format_table
from ml_core.schema import KeypointSchema
from ml_core.transforms import TransformSet, View, boxes_to_view
from ml_core.tta import EnsembleOptions


def view_logits(predictor, images: list[torch.Tensor], boxes: list[torch.Tensor], view: View) -> list[torch.Tensor]:
    """The keypoint head's logits of one view on fixed original-image boxes, one tensor per image."""
    model = predictor.model
    own = model.transform.min_size, model.transform.max_size
    try:
        batch = [im.flip(-1) if view.flip else im for im in images]
        model.transform.min_size, model.transform.max_size = (view.scale,), predictor.transforms.max_size
        image_list, _ = model.transform(batch)
        feats = model.backbone(image_list.tensors)
    finally:
        model.transform.min_size, model.transform.max_size = own
    in_view = [boxes_to_view(b, view, tuple(im.shape[-2:]), tuple(size))
               for b, im, size in zip(boxes, images, image_list.image_sizes)]
    return predictor._keypoint_logits(predictor.model, feats, image_list.image_sizes, in_view)


def variants(scales: list[int], box_scales: list[int], base: int) -> dict[str, list[View]]:
    both = lambda ss: [View(s, f) for s in ss for f in (False, True)]  # noqa: E731
    out = {f"box views ({','.join(map(str, box_scales))} x flip)": both(box_scales)}
    for s in scales:
        out[f"{s}"] = [View(s, False)]
        out[f"{s} x flip"] = both([s])
    below = [s for s in scales if s <= base]
    out[f"all views up to {base} x flip"] = both(below)
    out[f"all {len(scales)} scales x flip"] = both(scales)
    return out


@torch.inference_mode()
def measure(teacher: str, data: Path, scales: list[int], box_scales: list[int], device: str, group: int = 8) -> dict:
    val = load_coco(data / "val.json")
    labeled = load_coco(data / "labeled.json")
    transforms = TransformSet(box_scales)
    predictor, meta = pipeline.predictor_for(teacher, transforms, device=device)
    base = predictor.base_scale
    cats = meta["categories"]
    schema = KeypointSchema.from_dict(meta.get("keypoint_schema"))
    sigmas = schema.sigmas if schema else None
    table = variants(scales, box_scales, base)
    box_views = next(iter(table.values()))
    area = EnsembleOptions().keypoint_area_thresh
    size_dep = f"box views + scale-size dependence (area {area:.0f})"
    needed = sorted({v for views in table.values() for v in views}, key=lambda v: (v.scale, v.flip))
    preds: dict[str, dict[int, list[dict]]] = {name: {} for name in [*table, size_dep]}
    t0 = time.time()
    for start in range(0, len(val.images), group):
        ims = val.images[start:start + group]
        images = [load_image(data / "val" / im["file_name"]).to(device) for im in ims]
        results = predictor.predict(images)
        boxes = [r.ensembled.boxes.to(device) for r in results]
        logits = {v: view_logits(predictor, images, boxes, v) for v in needed}
        for name, views in [*table.items(), (size_dep, box_views)]:
            for i, (im, r) in enumerate(zip(ims, results)):
                keep = None
                if name == size_dep:
                    keep = ensemble.size_dependent_views(boxes[i], [v.scale for v in views], base, area)
                maps = ensemble.ensemble_heatmaps([logits[v][i] for v in views], [v.flip for v in views],
                                                  predictor.flip_inds, "mean", keep)
                kps, _ = ensemble.decode_heatmaps(maps, boxes[i])
                # boxes and scores unrounded, unlike Instances.as_list: the variants may differ by less than
                # its rounding
                items = []
                for bx, s, lab, k in zip(boxes[i].tolist(), r.ensembled.scores.tolist(), r.ensembled.labels.tolist(),
                                         kps.tolist()):
                    items.append({"bbox": [bx[0], bx[1], bx[2] - bx[0], bx[3] - bx[1]], "score": s, "label": lab,
                                  "category_id": cats[lab - 1]["id"], "keypoints": [round(c, 2) for p in k for c in p]})
                preds[name][im["id"]] = items
        print(f"  {start + len(ims)}/{len(val.images)} images, {time.time() - t0:.0f} s", flush=True)
    scores = [p["score"] for items in preds[size_dep].values() for p in items]
    thresh = selection.auto_threshold(scores, len(val.images), pipeline.annotated_per_image(labeled))
    doc = {"images": val.images, "categories": val.categories}
    truth = val.to_dict()
    rows = {}
    for name, by_image in preds.items():
        ev = COCOEvaluator(truth, "keypoints", sigmas)
        for image_id, items in by_image.items():
            ev.process(image_id, items)
        kept = pipeline.pseudo_label_doc(doc, by_image, thresh, val.categories)
        q = pipeline.pseudo_label_quality(kept, truth, sigmas)
        rows[name] = {"OKS AP, all": round(ev.evaluate()["AP"], 2), "OKS AP, kept": q["keypoints_AP"],
                      "box AP, kept": q["bbox_AP"]}
    return {"teacher": teacher, "threshold": round(thresh, 3), "base_scale": base, "images": len(val.images),
            "seconds": round(time.time() - t0, 1), "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True, help="folder with labeled.json, val.json and val/")
    ap.add_argument("--scales", default="64,72,80,88,96,112,128,160", help="candidate heatmap views (x flip)")
    ap.add_argument("--box-scales", default="64,96,128,160", help="the views whose union gives the boxes (x flip)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", help="write the table as JSON here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parse = lambda s: TransformSet.parse(s).scales  # noqa: E731
    res = measure(args.teacher, Path(args.data), parse(args.scales), parse(args.box_scales), args.device)
    print(f"keypoint views on {args.data}/val.json ({res['images']} images; teacher {args.teacher}, model size "
          f"{res['base_scale']}; boxes fixed; kept at the automatic threshold {res['threshold']}):")
    print(format_table(res["rows"], keys=("OKS AP, all", "OKS AP, kept", "box AP, kept")))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
