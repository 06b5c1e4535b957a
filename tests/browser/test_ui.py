import json
import re
from pathlib import Path

import pytest

from distill_app.models import Prediction, Review
from tests.conftest import png_bytes, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "review-screen.png"


def test_upload_images_and_see_them_listed(page, live_server, as_alice, tmp_path, celery_worker_process):
    p = as_alice.post("/api/projects/", {"name": "uploads", "task": "detection"}, format="json").json()
    as_alice.post("/api/datasets/", {"project": p["id"], "name": "pool", "role": "unlabeled"}, format="json")
    files = []
    for i in range(3):
        f = tmp_path / f"img{i}.png"
        f.write_bytes(png_bytes(color=(i * 40, 10, 10)))
        files.append(str(f))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not a png")
    page.goto(f"{live_server.url}/projects/{p['id']}/")
    page.set_input_files(".drop input[type=file]", files + [str(bad)])
    page.wait_for_selector(".upload-summary")
    assert page.inner_text(".upload-summary") == "3 accepted, 0 duplicate, 1 rejected"
    assert "broken.png" in page.inner_text("ul.results li.rejected")
    page.wait_for_function("document.querySelector('.dataset .counts').textContent.startsWith('3 images')")


def drawn(page):
    return page.evaluate("[...document.querySelectorAll('.tile')].reduce((s, t) => s + (+t.dataset.drawn || 0), 0)")


def test_threshold_slider_updates_overlays_and_statistics(page, live_server, ready_run, as_alice):
    page.goto(f"{live_server.url}/runs/{ready_run['run']}/review/")
    page.wait_for_selector("#review[data-ready='1']")
    page.wait_for_function("document.querySelectorAll('.tile').length === 12")

    def set_threshold(t):
        page.eval_on_selector("#threshold", "(el, t) => { el.value = t; el.dispatchEvent(new Event('input')); }", t)
        page.wait_for_function("(t) => document.getElementById('threshold-value').textContent === t.toFixed(3)", arg=t)

    set_threshold(0.0)
    low_drawn, low_kept = drawn(page), int(page.inner_text("#stat-kept").replace(",", ""))
    server = as_alice.get(f"/api/inference-runs/{ready_run['run']}/threshold-stats/?threshold=0").json()["current"]
    assert low_kept == server["instances"] == low_drawn > 0
    assert int(page.inner_text("#stat-images-with")) == server["images_with_labels"]
    scores = sorted(s for p in Prediction.objects.filter(run_id=ready_run["run"], image__dataset__role="unlabeled")
                    for s in (d["score"] for d in p.ensembled))
    # a threshold on the slider's 0.001 grid that splits the scores and equals none of them
    grid = [i / 1000 for i in range(1001)]
    mid = min((t for t in grid if 0 < sum(s >= t for s in scores) < len(scores) and all(abs(s - t) > 1e-6 for s in scores)),
              key=lambda t: abs(sum(s >= t for s in scores) - len(scores) / 2))
    set_threshold(mid)
    server = as_alice.get(f"/api/inference-runs/{ready_run['run']}/threshold-stats/?threshold={mid}").json()["current"]
    assert int(page.inner_text("#stat-kept").replace(",", "")) == server["instances"] == drawn(page) < low_drawn
    assert page.inner_text("#stat-precision").endswith("%")
    set_threshold(1.0)
    assert drawn(page) == 0 and page.inner_text("#stat-kept") == "0" and page.inner_text("#stat-images-with") == "0"
    page.click("#use-auto")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))


def test_compare_view_shows_one_panel_per_view(page, live_server, ready_run):
    page.goto(f"{live_server.url}/runs/{ready_run['run']}/review/")
    page.wait_for_selector("#review[data-ready='1']")
    page.click(".tile >> nth=0")
    page.wait_for_selector("dialog#detail[open] .view-panel")
    names = page.eval_on_selector_all(".view-panel", "els => els.map(e => e.dataset.view)")
    assert names == ["ensembled", "s48", "s48-flip", "s64", "s64-flip"]
    assert "agreement" in page.inner_text("#detail-agreement")


def test_validation_ap_of_the_ensemble_and_of_every_view_is_shown(page, live_server, ready_run, as_alice):
    page.goto(f"{live_server.url}/runs/{ready_run['run']}/review/")
    page.wait_for_selector("#view-ap-table")
    rows = page.eval_on_selector_all("#view-ap-table tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
    ap = as_alice.get(f"/api/inference-runs/{ready_run['run']}/threshold-stats/").json()["validation"]["ap"]["bbox"]
    assert [r[0] for r in rows] == ["ensembled", "view s48", "view s48-flip", "view s64", "view s64-flip"]
    assert [float(r[1]) for r in rows] == [round(ap[n]["AP"], 1) for n in ("ensembled", "s48", "s48-flip", "s64", "s64-flip")]


def tiles_drawn(page, images):
    """Wait until the grid's tiles are exactly these images; what each draws, read in the same
    snapshot (a grid being re-queried in between cannot be read half-built)."""
    return page.wait_for_function(
        """(ids) => { const ts = [...document.querySelectorAll('.tile')];
                    const got = ts.map(t => +t.dataset.image).sort((a, b) => a - b);
                    return JSON.stringify(got) === JSON.stringify(ids) && ts.map(t => +t.dataset.drawn); }""",
        arg=sorted(images)).json_value()


def open_review_all_boxes(page, live_server, run):
    """The review screen at threshold 0, in upload order, with all 12 tiles drawn."""
    page.goto(f"{live_server.url}/runs/{run}/review/")
    page.wait_for_selector("#review[data-ready='1']")
    page.eval_on_selector("#threshold", "el => { el.value = 0; el.dispatchEvent(new Event('input')); }")
    page.select_option("#ordering", "image")
    page.wait_for_function("document.querySelectorAll('.tile').length === 12")


def test_delete_a_box_and_find_the_review_through_the_api(page, live_server, ready_run, as_alice):
    run = ready_run["run"]
    open_review_all_boxes(page, live_server, run)
    first = next(r for r in as_alice.get(f"/api/inference-runs/{run}/predictions/?ordering=image").json()["results"]
                 if r["ensembled"])
    page.click(f".tile[data-image='{first['image']}']")
    page.wait_for_selector("canvas#editor[data-instances]")
    n = int(page.get_attribute("canvas#editor", "data-instances"))
    assert n == len(first["ensembled"]) > 0
    box = max(first["ensembled"], key=lambda d: d["score"])
    scale = page.evaluate("document.getElementById('editor').width") / first["width"]
    editor = page.locator("canvas#editor").bounding_box()
    page.mouse.click(editor["x"] + (box["bbox"][0] + box["bbox"][2] / 2) * scale,
                     editor["y"] + (box["bbox"][1] + box["bbox"][3] / 2) * scale)
    page.keyboard.press("Delete")
    page.wait_for_function("(n) => +document.getElementById('editor').dataset.instances === n", arg=n - 1)
    page.keyboard.press("s")
    review = wait_for(lambda: Review.objects.filter(run_id=run, image_id=first["image"]).first(), timeout=10, what="review")
    api = as_alice.get(f"/api/reviews/?run={run}&image={first['image']}").json()["results"][0]
    assert api["state"] == "edited" and len(api["instances"]) == n - 1 == len(review.instances)
    assert len(Prediction.objects.get(run_id=run, image_id=first["image"]).ensembled) == n  # raw kept


def test_launch_a_student_and_watch_it_train(page, live_server, ready_run):
    page.goto(f"{live_server.url}/runs/{ready_run['run']}/review/")
    page.wait_for_selector("#review[data-ready='1']")
    assert page.locator("#kp-threshold").is_hidden()   # a box project has no keypoints to leave out
    page.eval_on_selector("#threshold", "el => { el.value = 0.01; el.dispatchEvent(new Event('input')); }")
    page.fill("#student-form input[name=iterations]", "40")
    page.click("#launch")
    page.wait_for_url("**/training/*/", timeout=60000)
    seen = set()
    for _ in range(600):
        seen.add((page.get_attribute("#training", "data-state"), page.get_attribute("#training", "data-progress")))
        if any(st in ("succeeded", "failed", "cancelled") for st, _ in seen):
            break
        page.wait_for_timeout(200)
    progresses = sorted({float(p) for s, p in seen if p})
    assert ("succeeded", "1") in seen and len(progresses) >= 3, (seen, page.inner_text("#error"))  # progress advanced
    page.wait_for_selector("#ap-table tbody tr >> nth=1")
    assert page.eval_on_selector_all("#ap-table tbody tr", "rs => rs.map(r => r.dataset.model)") == ["student (this run)", "teacher"]


def test_user_text_is_escaped_everywhere(page, live_server, as_alice, tmp_path, celery_worker_process):
    evil = '<img src=x onerror="alert(1)">'
    p = as_alice.post("/api/projects/", {"name": evil, "task": "detection"}, format="json").json()
    as_alice.post("/api/datasets/", {"project": p["id"], "name": evil, "role": "unlabeled"}, format="json")
    f = tmp_path / "<b onmouseover=alert(2)>bold.png"
    f.write_bytes(png_bytes())
    page.goto(live_server.url + "/")
    page.wait_for_selector("#projects a")
    assert evil in page.inner_text("#projects")
    page.goto(f"{live_server.url}/projects/{p['id']}/")
    page.wait_for_selector(".dataset h3")
    assert evil in page.inner_text(".dataset h3")
    page.set_input_files(".drop input[type=file]", [str(f)])
    page.wait_for_selector(".upload-summary")
    assert page.locator("img[src=x]").count() == 0 and page.locator("ul.results b").count() == 0
    assert "<b onmouseover=alert(2)>bold.png" in page.inner_text("ul.results")


def test_expired_session_goes_to_login_and_back_without_losing_edits(page, live_server, ready_run):
    run = ready_run["run"]
    open_review_all_boxes(page, live_server, run)
    page.click(".tile >> nth=0")
    page.wait_for_selector("canvas#editor[data-instances]")
    n = int(page.get_attribute("canvas#editor", "data-instances"))
    page.evaluate("document.getElementById('editor').dispatchEvent(new MouseEvent('mousedown', {clientX: 0, clientY: 0}))")
    box = page.locator("canvas#editor").bounding_box()
    page.click("#btn-new")
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + 40, box["y"] + 40)
    page.mouse.up()
    page.wait_for_function("(n) => +document.getElementById('editor').dataset.instances === n", arg=n + 1)
    page.context.clear_cookies()  # the session expires
    page.keyboard.press("s")
    page.wait_for_url("**/login/?next=*")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "alice-password-123")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(rf"/runs/{run}/review/(\?.*)?$"))  # the review URL keeps its filters
    page.wait_for_selector("#review[data-ready='1']")
    page.select_option("#ordering", "image")
    page.wait_for_function("document.querySelectorAll('.tile').length === 12")
    page.click(".tile >> nth=0")
    page.wait_for_selector("canvas#editor[data-instances]")
    assert int(page.get_attribute("canvas#editor", "data-instances")) == n + 1
    assert "restored" in page.inner_text("#draft-note")


def test_a_new_box_in_a_keypoint_project_gets_keypoints_to_drag_into_place(page, live_server, keypoint_run, as_alice):
    page.goto(f"{live_server.url}/runs/{keypoint_run}/review/")
    page.wait_for_selector("#review[data-ready='1']")
    # a keypoint project offers to leave the least sure keypoints out of the pseudo-labels (the default)
    assert page.locator("#kp-threshold").is_visible() and page.input_value("#kp-threshold") == "auto"
    # what "auto" leaves out at the thresholds in force: the server's figure, drawn hollow on the tiles
    page.eval_on_selector("#threshold", "el => { el.value = 0.01; el.dispatchEvent(new Event('input')); }")
    th = page.evaluate("document.getElementById('threshold').value")
    cur = as_alice.get(f"/api/inference-runs/{keypoint_run}/threshold-stats/?thresholds={json.dumps({'default': float(th)})}").json()["current"]
    assert cur["keypoint_threshold_auto"] is not None, (th, cur)
    page.wait_for_function("(t) => { const c = document.getElementById('review').dataset.kpCut; "
                           "return c !== undefined && c !== '' && Math.abs(+c - t) < 1e-6; }", arg=cur["keypoint_threshold_auto"])
    assert f"{cur['keypoints_hidden_auto']} of {cur['keypoints_kept']} keypoints left out" in page.inner_text("#kp-note")
    page.select_option("#kp-threshold", "none")
    page.wait_for_function("document.getElementById('kp-note').textContent.startsWith('every keypoint')")
    page.select_option("#kp-threshold", "auto")
    page.click(".tile >> nth=0")
    page.wait_for_selector("dialog#detail[open] .view-panel")  # laid out: the editor stays where it is
    image = int(page.get_attribute(".tile >> nth=0", "data-image"))
    n = int(page.get_attribute("canvas#editor", "data-instances"))
    scale = page.evaluate("document.getElementById('editor').width") / 64
    ed = page.locator("canvas#editor").bounding_box()
    page.click("#btn-new")
    page.mouse.move(ed["x"] + 10 * scale, ed["y"] + 8 * scale)
    page.mouse.down()
    page.mouse.move(ed["x"] + 40 * scale, ed["y"] + 56 * scale, steps=4)
    page.mouse.up()
    page.wait_for_function("(n) => +document.getElementById('editor').dataset.instances === n", arg=n + 1)
    page.click("#btn-save")
    new = wait_for(lambda: (r := as_alice.get(f"/api/reviews/?run={keypoint_run}&image={image}").json()["results"])
                   and r[0]["instances"][-1], timeout=10, what="review")
    x, y, w, h = new["bbox"]
    kps = new["keypoints"]
    assert [x, y, w, h] == pytest.approx([10, 8, 30, 48], abs=0.5)  # the box follows the mouse
    assert len(kps) == 27 and all(v == 0 for v in kps[2::3])      # laid out, not yet labeled
    assert all(x - 1 <= kx <= x + w + 1 and y - 1 <= ky <= y + h + 1 for kx, ky in zip(kps[0::3], kps[1::3]))
    # drag the first keypoint a little: it becomes labeled (v = 2), the others stay unlabeled
    kx, ky = kps[0], kps[1]
    page.wait_for_function("() => document.getElementById('draft-note').textContent === ''")  # saved: layout settled
    ed = page.locator("canvas#editor").bounding_box()
    page.mouse.move(ed["x"] + kx * scale, ed["y"] + ky * scale)
    page.mouse.down()
    page.mouse.move(ed["x"] + (kx + 3) * scale, ed["y"] + (ky + 2) * scale, steps=3)
    page.mouse.up()
    page.click("#btn-save")
    moved = wait_for(lambda: (i := as_alice.get(f"/api/reviews/?run={keypoint_run}&image={image}").json()["results"][0]
                              ["instances"][-1])["keypoints"][2] == 2 and i, timeout=10, what="the dragged keypoint")
    assert moved["keypoints"][0] == pytest.approx(kx + 3, abs=0.6) and moved["keypoints"][5::3] == [0] * 8
