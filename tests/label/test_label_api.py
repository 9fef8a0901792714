"""`hanlm label`'s sampling and API: K answers per prompt with their model and temperature,
rankings validated and appended whole, concurrent labellers lose nothing, restarts keep both
the answers and the rankings, and the file is `ranked` data as is."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from hanlm.data.check import DataCheckConfig, check
from hanlm.label.ranking import RANKINGS_FILE, load_or_sample, slots

httpx = pytest.importorskip("httpx2", reason="httpx2 comes with the openai client")

LABEL_KEY = "label-key"
PROMPTS = ["床前明月光的下一句？", "Say hello.", "春眠不觉晓的下一句？"]
AUTH = {"Authorization": f"Bearer {LABEL_KEY}"}


def test_answer_slots_cycle_models_and_temperatures():
    assert slots(["a"], [0.7, 1.0], 4) == [("a", 0.7), ("a", 1.0), ("a", 0.7), ("a", 1.0)]
    assert slots(["a", "b"], [0.7, 1.0], 4) == [("a", 0.7), ("b", 0.7), ("a", 1.0), ("b", 1.0)]


def test_rankings_are_checked_appended_and_survive_a_restart(label_app):
    served, out, items, cfg = label_app
    assert [it["prompt"] for it in items] == PROMPTS
    assert all(len(it["responses"]) == 3 for it in items)
    assert sorted(items[0]["temperatures"]) == [0.7, 0.7, 1.0]
    url = served.url
    assert httpx.get(url + "/api/items").status_code == 401
    assert "排序标注" in httpx.get(url + "/").text  # the page itself needs no key

    def post(body):
        return httpx.post(url + "/api/rank", json=body, headers=AUTH)

    bad = post({"id": 0, "labeller": "甲", "ranking": [0, 5, 1]})
    assert bad.status_code == 400 and "out of range" in bad.json()["error"]
    assert post({"id": 9, "labeller": "甲", "ranking": [0, 1, 2]}).status_code == 404
    assert post({"id": 0, "ranking": [0, 1, 2]}).status_code == 400  # no labeller
    ok = post({"id": 0, "labeller": "甲", "ranking": [[2, 0], 1], "comment": "还行"})
    assert ok.status_code == 200 and ok.json() == {"ok": True, "done": 1, "total": 3}
    assert post({"id": 0, "labeller": "甲", "ranking": [0, 1, 2]}).status_code == 409
    allbad = post({"id": 1, "labeller": "甲", "all_bad": True})
    assert allbad.status_code == 200
    got = httpx.get(url + "/api/items", params={"labeller": "甲"}, headers=AUTH).json()
    assert got["done"] == [0, 1] and got["total"] == 3

    rows = [json.loads(x) for x in (out / RANKINGS_FILE).read_text("utf-8").splitlines()]
    assert [r["ranking"] for r in rows] == [[[2, 0], 1], [[0, 1, 2]]]
    assert rows[0]["labeller"] == "甲" and rows[0]["comment"] == "还行" and rows[1]["all_bad"]
    assert rows[0]["models"] == items[0]["models"] and rows[0]["responses"] == items[0]["responses"]

    # `hanlm data check` reads the page's output as ranked data, as is
    res = check(DataCheckConfig(paths=[str(out / RANKINGS_FILE)]), out=lambda *_: None)
    assert next(iter(res.values()))["format"] == "ranked"
    assert next(iter(res.values()))["good"] == 2

    # a restart reuses the answers (no resampling) and knows who ranked what
    again = load_or_sample(cfg, out)
    assert again == items
    from hanlm.label.ranking import Rankings

    assert Rankings(out / RANKINGS_FILE, items).done == {"甲": {0, 1}}


def test_concurrent_labellers_lose_no_write(label_app):
    served, out, items, _ = label_app
    names = [f"labeller{i}" for i in range(8)]
    jobs = [(n, it["id"]) for n in names for it in items]  # 24 rankings at once

    def post(job):
        name, item = job
        body = {"id": item, "labeller": name, "ranking": [2, 1, 0]}
        return httpx.post(served.url + "/api/rank", json=body, headers=AUTH, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=12) as ex:
        codes = list(ex.map(post, jobs + jobs[:6]))  # the last 6 repeat: refused
    assert codes[:24] == [200] * 24 and codes[24:] == [409] * 6
    rows = [json.loads(x) for x in (out / RANKINGS_FILE).read_text("utf-8").splitlines()]
    assert sorted((r["labeller"], r["id"]) for r in rows) == sorted(jobs)


def test_other_answers_in_the_same_directory_are_refused(label_app, tmp_path):
    from dataclasses import replace

    from hanlm.config import ConfigError

    _, out, _, cfg = label_app
    with pytest.raises(ConfigError, match="other prompts, models or settings"):
        load_or_sample(replace(cfg, k=2), out)


def test_answers_from_several_models_name_their_model(tmp_path, tiny_model_path):
    from hanlm.config import load_config
    from hanlm.label.ranking import LabelConfig
    from hanlm.testing import tiny_model_dir

    other = tiny_model_dir(tmp_path / "other", seed=1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "你好"}, ensure_ascii=False) + "\n", "utf-8")
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config(
        LabelConfig,
        None,
        [f"inputs=[{prompts},{tiny_model_path},{other}]", "k=4", "max_new_tokens=4"],
    )
    [item] = load_or_sample(cfg, out)
    assert sorted(zip(item["models"], item["temperatures"])) == sorted(
        [
            (str(tiny_model_path), 0.7),
            (str(tiny_model_path), 1.0),
            (str(other), 0.7),
            (str(other), 1.0),
        ]
    )
