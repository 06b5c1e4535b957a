import json

from distill_app.cli import main


def test_pipeline_end_to_end_on_cpu(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    assert main(["synth", str(data), "--size", "64", "--labeled", "8", "--unlabeled", "6", "--val", "4"]) == 0
    rc = main(["pipeline", "--data", str(data), "--out", str(out), "--arch", "fasterrcnn_tiny", "--iterations", "3",
               "--student-iterations", "3", "--eval-every", "3", "--rounds", "2", "--batch-size", "2",
               "--scales", "48,64", "--workers", "0", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "student (ensembled)" in printed and "best validation AP" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"teacher", "student (ensembled)", "control (teacher + labels only)",
                                      "student (ensembled) round 2"}
    assert "AP" in report["results"]["teacher"]["bbox"] and report["options"]["keypoint_scales"] == "auto"
    assert [r["round"] for r in report["rounds"]] == [1, 2] and report["rounds"][1]["teacher"].endswith("student.pt")
    # round 2's labeler, chosen on the validation set: the student alone or with the model that taught it
    choice = report["rounds"][1]["labeler_choice"]
    assert choice["by"] == "bbox_AP" and {"precision", "recall", "bbox_AP"} <= set(choice["student"])
    assert choice["chosen"] == ("ensemble" if choice["ensemble"]["bbox_AP"] > choice["student"]["bbox_AP"] else "student")
    assert report["rounds"][0]["ensembled_with"] == [] and "labeler_choice" not in report["rounds"][0]
    assert report["rounds"][1]["ensembled_with"] == ([str(out / "teacher.pt")] if choice["chosen"] == "ensemble" else [])
    assert report["training"]["teacher"]["validation"][-1]["iteration"] == 3


def test_infer_select_evaluate_commands(tmp_path, capsys):
    data = tmp_path / "d"
    main(["synth", str(data), "--size", "64", "--labeled", "6", "--unlabeled", "4", "--val", "3"])
    ck = tmp_path / "t.pt"
    assert main(["train", str(data / "labeled.json"), "--out", str(ck), "--arch", "fasterrcnn_tiny", "--iterations", "2",
                 "--batch-size", "2", "--workers", "0", "--device", "cpu"]) == 0
    assert main(["infer", str(ck), str(data / "unlabeled.json"), "--scales", "48,64", "--out", str(tmp_path / "p.json"),
                 "--views-out", str(tmp_path / "v.json"), "--workers", "1", "--device", "cpu"]) == 0  # forkserver loading
    assert main(["infer", str(ck), str(data / "unlabeled.json"), "--scales", "48,64", "--keypoint-scales", "50",
                 "--out", str(tmp_path / "x.json"), "--workers", "0", "--device", "cpu"]) == 2
    assert "keypoint_scales 50 not among the views' scales (48, 64)" in capsys.readouterr().err
    views = json.loads((tmp_path / "v.json").read_text())
    assert {v["view"] for v in views} <= {"s48", "s48-flip", "s64", "s64-flip"}
    assert main(["infer", str(ck), str(data / "unlabeled.json"), "--scales", "48", "--no-flip", "--with", str(ck),
                 "--views-out", str(tmp_path / "v2.json"), "--out", str(tmp_path / "p2.json"), "--workers", "0",
                 "--device", "cpu"]) == 0
    assert {v["view"] for v in json.loads((tmp_path / "v2.json").read_text())} <= {"m1-s48", "m2-s48"}
    assert main(["select", str(tmp_path / "p.json"), str(data / "unlabeled.json"), "--threshold", "auto",
                 "--labeled", str(data / "labeled.json"), "--out", str(tmp_path / "pl.json")]) == 0
    assert main(["evaluate", str(ck), str(data / "val.json"), "--json", "--device", "cpu"]) == 0
    assert '"AP"' in capsys.readouterr().out
    assert main(["evaluate", str(ck), str(data / "val.json"), "--scales", "48,64", "--json", "--device", "cpu"]) == 0
    by_view = json.loads(capsys.readouterr().out)
    assert list(by_view) == ["ensembled", "s48", "s48-flip", "s64", "s64-flip"] and "AP" in by_view["s64"]["bbox"]


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.pt"), "--arch", "nope"]) == 2
    assert "error" in capsys.readouterr().err


def test_select_leaves_low_scored_keypoints_unlabeled(tmp_path, capsys):
    data = tmp_path / "d"
    main(["synth", str(data), "--kind", "keypoints", "--size", "64", "--labeled", "4", "--unlabeled", "2", "--val", "1"])
    image_id = json.loads((data / "unlabeled.json").read_text())["images"][0]["id"]
    results = [{"image_id": image_id, "bbox": [4, 4, 30, 40], "score": 0.9, "label": 1, "category_id": 1,
                "keypoints": [10.0, 10.0, 1] * 9, "keypoint_scores": [float(j) for j in range(9)]}]
    (tmp_path / "p.json").write_text(json.dumps(results))
    args = ["select", str(tmp_path / "p.json"), str(data / "unlabeled.json"), "--threshold", "0.5",
            "--out", str(tmp_path / "pl.json")]
    assert main(args + ["--keypoint-threshold", "2.5"]) == 0
    a = json.loads((tmp_path / "pl.json").read_text())["annotations"][0]
    assert a["keypoints"][2::3] == [0, 0, 0, 1, 1, 1, 1, 1, 1] and a["num_keypoints"] == 6
    assert main(args + ["--keypoint-threshold", "none"]) == 0
    assert json.loads((tmp_path / "pl.json").read_text())["annotations"][0]["num_keypoints"] == 9
    assert main(args) == 2 and "--keypoint-threshold auto needs --labeled" in capsys.readouterr().err
    assert main(args + ["--labeled", str(data / "labeled.json")]) == 0
    assert "left unlabeled" in capsys.readouterr().out
