"""The library surface: no import cycles, every model round-trips through save/load, runs
rerun from their config, bundles rank with the saved ranker, the README example runs."""
import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT
from main import cli

PROJECT_MODULES = {p.stem for p in ROOT.glob("*.py")} | {"model", "bench"} | {
    f"model.{p.stem}" for p in (ROOT / "model").glob("*.py") if p.stem != "__init__"}


def _lazy_names() -> dict[str, str]:
    """model/__init__.py's name -> submodule map (its imports are lazy)."""
    tree = ast.parse((ROOT / "model" / "__init__.py").read_text())
    assign = next(n for n in tree.body if isinstance(n, ast.Assign)
                  and getattr(n.targets[0], "id", "") == "_WHERE")
    return ast.literal_eval(assign.value)


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (anywhere in the file, functions included)."""
    lazy, graph = _lazy_names(), {}
    files = [*ROOT.glob("*.py"), *(ROOT / "model").glob("*.py"), ROOT / "bench" / "__init__.py"]
    for path in files:
        name = path.stem if path.parent == ROOT else (
            path.parent.name if path.stem == "__init__" else f"{path.parent.name}.{path.stem}")
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                edges.add(node.module)
                if node.module == "model":  # `from model import X` really imports X's module
                    edges |= {lazy[a.name] for a in node.names if a.name in lazy}
        graph[name] = {e for e in edges if e in PROJECT_MODULES and e != name}
    return graph


def test_no_import_cycle_and_coremethod_is_a_leaf():
    graph = import_graph()
    assert graph["coreMethod"] == {"utils"}
    assert graph["utils"] == set() and graph["model"] == set()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [target])}"
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_project_imports_sit_at_module_level():
    for path in [*ROOT.glob("*.py"), *(ROOT / "model").glob("*.py")]:
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, ast.ImportFrom) and node.module:
                        top = node.module.split(".")[0]
                        assert top not in {m.split(".")[0] for m in PROJECT_MODULES}, \
                            f"{path.name}:{node.lineno} imports {node.module} inside a function"


def test_small_files():
    for path in [*ROOT.glob("*.py"), *(ROOT / "model").glob("*.py"), *ROOT.glob("tests/*.py")]:
        assert len(path.read_text().splitlines()) <= 600, path
    assert len((ROOT / "main.py").read_text().splitlines()) < 400  # commands only


# ---------------------------------------------------------------- models round-trip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dataHandler import open_dataset

    return open_dataset("demo", tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def text_model(demo, tiny_roberta, tmp_path_factory):
    from model import TextEncoder, TextRecall

    encoder = TextEncoder.from_pretrained(str(tiny_roberta), layers=2)
    return TextRecall(encoder, str(tmp_path_factory.mktemp("cache"))).fit(demo)


FAST = {"epochs": 4, "batch": 2048, "eval_every": 2, "patience": 2}


def _fitted(kind: str, demo, text_model):
    from model import ALS, DeepWalk, Fusion, GraphSAGE, LightGCN, Popularity

    if kind == "text":
        return text_model
    if kind == "popularity":
        return Popularity().fit(demo)
    if kind == "tfidf":
        from model import TfidfRecall
        return TfidfRecall().fit(demo)
    if kind == "als":
        return ALS(factors=16, iterations=3).fit(demo)
    if kind == "deepwalk":
        return DeepWalk(dim=16, walks_per_node=2, walk_length=8, epochs=1).fit(demo)
    if kind == "graphsage":
        return GraphSAGE(dim=16, id_dim=8, train=FAST, device="cpu").fit(demo, text_model)
    if kind == "lightgcn":
        return LightGCN(dim=16, train=FAST, device="cpu").fit(demo)
    method = kind.split("-")[1]
    parts = {"text": text_model, "lightgcn": _fitted("lightgcn", demo, text_model)}
    return Fusion(method, dim=16, train=FAST, device="cpu").fit(demo, parts)


@pytest.mark.parametrize("kind", ["popularity", "als", "tfidf", "text", "deepwalk", "graphsage",
                                  "lightgcn", "fused-concat", "fused-projection"])
def test_every_model_round_trips(kind, demo, text_model, tmp_path):
    from model import Recommender

    model = _fitted(kind, demo, text_model)
    users = np.arange(0, demo.n_users, 7)
    items, scores = model.recommend(users, k=20)
    model.save(tmp_path / kind)
    loaded = Recommender.load(tmp_path / kind)
    assert type(loaded) is type(model) and loaded.name == model.name
    again, again_scores = loaded.recommend(users, k=20)
    assert np.array_equal(items, again) and np.allclose(scores, again_scores)
    seen = demo.train[users].toarray() > 0
    picked = np.take_along_axis(seen, np.maximum(items, 0), 1) & (items >= 0)
    assert not picked.any()  # training items never come back
    if kind != "popularity":
        assert np.array_equal(model.similar_items([3, 5], 5)[0], loaded.similar_items([3, 5], 5)[0])


def test_loading_checks_the_class_and_the_folder(demo, tmp_path):
    from model import LightGCN, ModelError, Popularity, Recommender

    Popularity().fit(demo).save(tmp_path / "pop")
    with pytest.raises(ModelError, match="holds a Popularity, not a LightGCN"):
        LightGCN.load(tmp_path / "pop")
    with pytest.raises(ModelError, match="not a saved model"):
        Recommender.load(tmp_path)
    with pytest.raises(ModelError, match="unknown user row 9999"):
        Recommender.load(tmp_path / "pop").recommend([9999])


def test_saved_text_model_rebuilds_its_encoder(text_model, tmp_path):
    from model import Recommender

    text_model.save(tmp_path / "text")
    loaded = Recommender.load(tmp_path / "text")
    profile = ["Loves Thai curry and quiet cafes."]
    assert np.allclose(loaded.embed_profiles(profile), text_model.embed_profiles(profile),
                       atol=1e-6)


def test_ranker_round_trips(demo, text_model, tmp_path):
    from model import LightGCN, WideDeepRanker

    from model.tuning import tuned

    recall = LightGCN(dim=16, train=FAST, device="cpu").fit(demo)
    item_item = {"rp3beta": tuned("rp3beta", demo, {}, tune=False).sparse_weights()}
    ranker = WideDeepRanker(candidates=30, epochs=2, device="cpu", members=2)
    ranker.fit(demo, recall, item_item=item_item)
    users = np.arange(0, demo.n_users, 5)
    ranker.save(tmp_path / "ranker")
    loaded = WideDeepRanker.load(tmp_path / "ranker", device="cpu")
    items, scores = ranker.recommend(users, demo.train, 20)
    loaded_items, loaded_scores = loaded.recommend(users, demo.train, 20)
    assert np.array_equal(items, loaded_items) and np.allclose(scores, loaded_scores)
    pairs = users, items[:, 0], np.zeros(len(users), dtype=np.int64)
    assert np.array_equal(ranker.features.build(*pairs)["dense"],  # the item-item scores too
                          loaded.features.build(*pairs)["dense"])
    assert len(loaded.nets) == len(ranker.nets) == 2 and not loaded.kept_recall_order
    channels = loaded.channel_candidates_of(users, demo.train)
    ranks = channels.ranks(*pairs[:2])
    each = [net.score(loaded.features, *pairs[:2], ranks) for net in loaded.nets]
    assert not np.allclose(*each)  # two networks, and the ranker's score is their mean
    assert np.allclose(loaded_scores[:, 0], (each[0] + each[1]) / 2, atol=1e-6)  # as served


# ---------------------------------------------------------------- runs, configs, bundles


def _run(*args: str) -> Path:
    result = CliRunner().invoke(cli, ["run", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Path([l for l in result.output.splitlines() if l.startswith("run written to ")][-1][15:])


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory, tiny_roberta):
    root = tmp_path_factory.mktemp("ranked")
    run_dir = _run("--dataset", "demo", "--base-model", str(tiny_roberta), "--layers", "2",
                   "--no-quantize", "--epochs", "4", "--dw-epochs", "1", "--rank", "widedeep",
                   "--rank-epochs", "2", "--data-root", str(root / "data"), "--runs-dir",
                   str(root / "runs"), "--cache-dir", str(root / "cache"))
    return root, run_dir


def test_rerun_from_config_gives_the_same_metrics(ranked_run):
    root, run_dir = ranked_run
    again = _run("--config", str(run_dir / "config.json"))
    first, second = (json.loads((d / "metrics.json").read_text())["variants"]
                     for d in (run_dir, again))
    assert list(first) == list(second) and "fused + Wide&Deep" in first
    for variant, result in first.items():
        assert result["status"] == second[variant]["status"]
        for metric, value in result.get("metrics", {}).items():
            assert second[variant]["metrics"][metric] == value, variant  # exact
    assert sorted(p.name for p in (run_dir / "models").iterdir()) == sorted(
        ["popularity", "als", "ease", "rp3beta", "itemknn", "tfidf", "text", "deepwalk",
         "graphsage", "lightgcn", "simgcl", "fused", "fused_wide_deep"])


def test_yaml_config_with_flags_on_top(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("data:\n  dataset: demo\n  data_root: %s\ngraph:\n  epochs: 2\n"
                      "run:\n  variants: lightgcn\n  ks: [10, 20]\n" % (tmp_path / "data"))
    run_dir = _run("--config", str(config), "--model", "popularity", "--runs-dir",
                   str(tmp_path / "runs"))
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["graph"]["epochs"] == 2 and saved["run"]["ks"] == [10, 20]
    assert saved["run"]["variants"] == "popularity"  # the flag wins over the file
    config.write_text("graph:\n  epoch: 2\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(config)])
    assert result.exit_code != 0 and "epoch (section 'graph')" in result.output
    config.write_text("graph:\n  epochs: 2\n  lr: [1, }\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(config)])
    assert f"{config}:3: malformed YAML" in result.output  # the file and line, on one line


def test_bundle_ranks_with_the_runs_ranker_alone(ranked_run, tmp_path):
    from model import WideDeepRanker
    from model.bundle import Bundle

    root, run_dir = ranked_run
    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["export", "--run", str(run_dir), "--variant", "fused",
                                      "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(cli, ["recommend", "--bundle", str(out), "--user", "5", "--rank",
                                     "-k", "10"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    listed = [line.split("\t")[1] for line in shown.output.splitlines()[1:]]
    bundle = Bundle(out)
    ranker = WideDeepRanker.load(run_dir / "models" / "fused_wide_deep", device="cpu")
    expected = ranker.recommend(np.array([5]), bundle.seen, 10)[0][0]
    assert listed == [bundle.item_ids[i] for i in expected]
    assert not set(listed) & {bundle.item_ids[i] for i in bundle.seen[5].indices}
    without = CliRunner().invoke(cli, ["recommend", "--bundle", str(root / "nope"), "--user",
                                       "5", "--rank"])
    assert without.exit_code != 0 and "not a bundle" in without.output


def test_an_hnsw_bundle_ranks_with_checked_channels_the_same_way_every_load(ranked_run,
                                                                           tmp_path):
    from model.bundle import Bundle

    _, run_dir = ranked_run
    out = tmp_path / "hnsw"
    result = CliRunner().invoke(cli, ["export", "--run", str(run_dir), "--variant", "fused",
                                      "--out", str(out), "--index", "hnsw"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    bundle = Bundle(out)
    channels = bundle.manifest["ranker"]["channels"]
    assert channels["kind"] == ("hnsw" if channels["ranked_overlap@20"] >= channels["target"]
                                else "flat")
    assert bundle.ranker.channel_index[0] == channels["kind"]
    first = [bundle.recommend(str(u), 10, rank=True) for u in range(20)]
    again = Bundle(out)  # graphs rebuilt on load: built single-threaded, so the same
    assert [again.recommend(str(u), 10, rank=True) for u in range(20)] == first


def test_a_run_config_with_the_old_gensim_workers_option_loads(tmp_path):
    from model.config import ExperimentConfig

    old = ExperimentConfig().to_dict()
    old["graph"]["workers"] = old["graph"].pop("dw_workers") + 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    loaded = ExperimentConfig.load(path)
    assert loaded.graph.dw_workers == 3 and loaded.run.workers == 2


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "models" / "lightgcn" / "model.json").exists()


def test_a_saved_model_loads_in_a_fresh_process(demo, tmp_path):
    import subprocess
    import sys

    from model import LightGCN

    model = LightGCN(dim=8, train=FAST, device="cpu").fit(demo)
    model.save(tmp_path / "lgn")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from model import Recommender; "
            "print(Recommender.load(sys.argv[2]).recommend([0], k=5)[0].tolist())")
    shown = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "lgn")],
                           capture_output=True, text=True, check=True).stdout
    assert shown.strip() == str(model.recommend([0], k=5)[0].tolist())


def test_fusion_keeps_its_parts_through_save_and_load(demo, text_model, tmp_path):
    from model import Recommender

    fused = _fitted("fused-concat", demo, text_model)
    fused.save(tmp_path / "fused")
    loaded = Recommender.load(tmp_path / "fused")
    assert list(loaded.signals()) == list(fused.signals()) == ["fused", "text", "lightgcn"]
    for name, (users, items) in fused.signals().items():
        assert np.allclose(loaded.signals()[name][0], users)
    if fused.text_block:  # the text part's encoder travels with the fused model
        assert (tmp_path / "fused" / "encoder").exists()


def test_top_k_breaks_ties_by_the_lower_item_at_the_cut():
    from coreMethod import top_k_rows

    block = np.array([[1.0, 2.0, 1.0, 1.0, -np.inf, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    items, scores = top_k_rows(block, 3)
    assert items.tolist() == [[1, 0, 2], [5, 0, 1]]
    items, _ = top_k_rows(np.array([[-np.inf, 1.0, -np.inf]]), 3)
    assert items.tolist() == [[1, -1, -1]]


def test_config_values_are_read_as_their_declared_types():
    from model.config import ConfigError, ExperimentConfig

    config = ExperimentConfig.from_dict({"graph": {"lr": "1e-3", "epochs": "40",
                                                   "fuse_parts": "text,lightgcn"},
                                         "run": {"ks": "5,20"}, "encoder": {"quantize": "no"}})
    assert (config.graph.lr, config.graph.epochs, config.run.ks) == (1e-3, 40, [5, 20])
    assert config.graph.fuse_parts == ["text", "lightgcn"] and config.encoder.quantize is False
    for bad, message in (({"graph": {"epochs": 2.5}}, "epochs must be int"),
                         ({"run": {"quantize": False}}, r"quantize \(section 'run'\)"),
                         ({"graph": {"fusion": "sum"}}, "fusion must be one of")):
        with pytest.raises(ConfigError, match=message):
            ExperimentConfig.from_dict(bad)
    both = "epoch \\(section 'graph'\\), model_name \\(section 'run'\\)"  # every bad key named
    with pytest.raises(ConfigError, match=both):
        ExperimentConfig.from_dict({"graph": {"epoch": 2}, "run": {"model_name": "als"}})
    # the command-line names of --model and --encoder, flat or in their sections
    flat = ExperimentConfig.from_dict({"model": "als", "encoder": "/models/small"})
    nested = ExperimentConfig.from_dict({"run": {"model": "als"},
                                         "encoder": {"encoder": "/models/small"}})
    for config in (flat, nested):
        assert (config.run.variants, config.encoder.encoder_path) == ("als", "/models/small")
    with pytest.raises(ConfigError, match="variants and model are the same option"):
        ExperimentConfig.from_dict({"variants": "ease", "model": "als"})
    with pytest.raises(ConfigError, match=r"model \(section 'graph'\)"):  # as written
        ExperimentConfig.from_dict({"graph": {"model": "als"}})
