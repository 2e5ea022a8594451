"""The experiment runner (`ppu-fast run` / `demo`, `run_experiment`, `python -m ppu_fast.tables`)
against a hostile user: each test failed on the code before its fix."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ppu_fast.cli import main
from ppu_fast.data import make_split


def _run(argv, capsys):
    """(exit status, stderr) of ``ppu-fast ARGV``; argparse's refusals included (status 2)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_first_method_is_not_charged_the_first_optimizer(tmp_path):
    """The first torch optimizer of a process imports torch._dynamo (~1 s): run_experiment pays it
    before timing anything (it landed in whichever method came first, e.g. PPU at 1.0 s instead of
    0.1 s when Original and Retrain came from the cache: "1.7x faster than Retrain" for 23x)."""
    script = textwrap.dedent("""
        import sys, ppu_fast.unlearn.experiment as ex
        assert "torch._dynamo" not in sys.modules
        seen = []
        real = ex.unlearn
        def spy(*a, **k):
            seen.append("torch._dynamo" in sys.modules)
            return real(*a, **k)
        ex.unlearn = spy
        # Starting weights as if from the cache: no optimizer is built before the methods.
        ex.fit_cached = lambda model, *a, **k: (model, {"cached": True, "train_seconds": 0.0})
        ex.run_experiment(dataset="digits5", model="smallcnn", width=0.25, methods=["original", "finetune"],
                          seeds=[0], method_kwargs={"finetune": {"epochs": 1}}, cache=False)
        print(seen)
        assert seen and seen[0], seen
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("seeds", ["0,4294967296", "0,18446744073709551616", ""])
def test_seeds_out_of_range_refused_as_parsed(seeds, tmp_path, capsys):
    """Seeds torch cannot take were found after the earlier seeds had run (nothing written)."""
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", "--seeds", seeds,
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "argument --seeds: expected distinct integers in [0, 2**32 - 1]" in err
    code, err = _run(["demo", "--seed", "4294967296", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "argument --seed: expected an integer in [0, 2**32 - 1]" in err
    from ppu_fast.unlearn.experiment import run_experiment
    with pytest.raises(ValueError, match=r"seeds: 4294967296 is not a seed"):
        run_experiment(dataset="digits5", methods=["original"], seeds=[0, 2 ** 32])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,what", [
    ("--seeds", "1,,2", "integers"), ("--seeds", "1,2,", "integers"), ("--seeds", ",1", "integers"),
    ("--lam-sweep", "0.5,,2", "numbers"), ("--methods", "original,,ppu", "names")])
def test_empty_list_entries_refused(flag, value, what, tmp_path, capsys):
    """An empty entry in a comma-separated list ("1,,2") was dropped: the run went on with one
    value fewer than typed."""
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", flag, value,
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"argument {flag}: expected comma-separated {what} without empty " \
                         f"entries, got {value!r}" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,expected", [
    ("--unlearn-lr", "-0.01", "a positive number"), ("--unlearn-lr", "0", "a positive number"),
    ("--retain-fraction", "0", "a share in (0, 1]"), ("--retain-per-epoch", "-5", "a positive integer"),
    ("--lam", "-1", "a number in [1e-30, 1e30]"), ("--lam-sweep", "1,1e31", "a number in [1e-30, 1e30]")])
def test_ppu_option_values_refused_as_parsed(flag, value, expected, tmp_path, capsys):
    """Bad PPU option values were refused only after Original and Retrain had trained."""
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", flag, value,
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"argument {flag}: expected {expected}" in err, err


def test_ppu_options_without_a_ppu_method_refused(tmp_path, capsys):
    """--unlearn-epochs & co. with no PPU method in --methods were dropped silently."""
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", "--methods",
                      "original,finetune", "--unlearn-epochs", "3", "--ppu-schedule", "paper",
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--unlearn-epochs, --ppu-schedule: only the PPU methods" in err, err


def test_class_scenario_on_a_small_scale_dataset_refused(tmp_path, capsys):
    """digits5 / cifar5 ran their fixed selective split under --scenario class and recorded
    "selective"."""
    with pytest.raises(ValueError, match="scenario='class': 'digits5' has the paper's fixed"):
        make_split("digits5", scenario="class")
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", "--methods", "original",
                      "--scenario", "class", "--seeds", "0", "--epochs", "0",
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "scenario='class'" in err, err


@pytest.mark.parametrize("out", ["/dev/null/sub", "/proc/ppu_fast_out", ""])
def test_unwritable_out_refused_before_training(out, capsys):
    """An --out that cannot be created was found after every model had trained (a traceback,
    exit 1); an empty --out wrote into the current folder."""
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", "--methods", "original",
                      "--seeds", "0", "--out", out], capsys)
    assert code == 2 and "--out: " in err and "Traceback" not in err, err


def test_check_out_leaves_no_folder(tmp_path, capsys):
    """The --out check creates nothing when the command is refused afterwards."""
    out = tmp_path / "a" / "b"
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", "--methods", "bogus",
                      "--out", str(out)], capsys)
    assert code == 2 and not (tmp_path / "a").exists()


def test_tables_refuses_what_is_not_a_results_file(tmp_path, capsys):
    """results.json holding [], {} or {"config": {}} crashed with TypeError / KeyError; invalid
    JSON's message named no file; --out naming a file crashed with FileExistsError."""
    from ppu_fast.tables import main as tables_main
    for i, text in enumerate(["[]", "{}", '{"config": {}}', "{not json"]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "results.json").write_text(text)
        assert tables_main([str(d)]) == 2
        err = capsys.readouterr().err
        assert str(d / "results.json") in err and "Traceback" not in err, err
    (tmp_path / "afile").write_text("x")
    assert tables_main([str(tmp_path / "r0"), str(tmp_path / "r1"), "--out", str(tmp_path / "afile")]) == 2
    assert "--out: " in capsys.readouterr().err


def test_merge_refuses_runs_of_different_devices(tmp_path):
    """Seconds on a CPU and on a GPU were averaged into one row (the first run's device kept)."""
    from ppu_fast.tables import merge
    per = {"ppu": {"test_error": 1.0, "retain_error": 1.0, "forget_error": 1.0, "mia": 50.0,
                   "seconds": 1.0}}
    for i, device in enumerate(["cpu", "cuda:0"]):
        d = tmp_path / f"s{i}"
        d.mkdir()
        cfg = {"dataset": "digits5", "model": "smallcnn", "width": 1.0, "scenario": "selective",
               "seeds": [i], "methods": ["ppu"], "device": device}
        (d / "results.json").write_text(json.dumps({"config": cfg, "per_seed": [per], "methods": {}}))
    with pytest.raises(ValueError, match="device type: 'cuda' vs 'cpu'"):
        merge([tmp_path / "s0", tmp_path / "s1"])


def test_demo_removes_a_former_runs_tables(tmp_path, monkeypatch, capsys):
    """The demo writes no tables: those of a former `run` in the same folder stayed beside the
    demo's results.json, headed with the other experiment."""
    from ppu_fast import cli
    from ppu_fast.tables import TABLE_FILES
    out = tmp_path / "o"
    out.mkdir()
    for name in TABLE_FILES.values():
        (out / name).write_text("a former run's")
    fake = {"config": {"dataset": "digits", "model": "smallcnn", "scenario": "class", "seeds": [0],
                       "methods": ["original"]},
            "per_seed": [{"original": {"test_error": 1.0, "retain_error": 0.0, "forget_error": 0.0,
                                       "mia": 50.0, "seconds": 0.0}}], "history": {}}
    monkeypatch.setattr("ppu_fast.unlearn.experiment.run_experiment", lambda **kw: fake)
    assert cli.main(["demo", "--out", str(out), "--no-progress"]) == 0
    assert not any((out / name).exists() for name in TABLE_FILES.values())
    assert (out / "results.json").is_file()


def test_unreadable_image_in_an_image_folder(tmp_path):
    """A file PIL cannot read crashed the run with PIL.UnidentifiedImageError; it is named now."""
    import numpy as np
    from PIL import Image
    for sub in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / sub / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / sub / c / f"{i}.png")
    (tmp_path / "train" / "a" / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"data_root: '.*x\.png' is not a readable image"):
        split = make_split("imagefolder", data_root=tmp_path, forget_class=0, num_forget=1)
        _ = split.train[0]
        for i in range(len(split.train)):
            split.train[i]


def _write(folder: Path, result: dict) -> Path:
    from ppu_fast.report import summarize
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(
        {"config": result["config"], "per_seed": result["per_seed"],
         "methods": summarize(result["per_seed"])}, default=str))
    return folder


def test_merge_compares_the_options_methods_ran_with(tmp_path):
    """Runs record each method's options as it ran them, defaults and presets included: two runs of
    other seeds merge whether the defaults were typed or not (refused before: the typed flags
    differed), and a run whose defaults differ (another version) is refused (merged before: both
    recorded no flags)."""
    from ppu_fast.tables import merge
    from ppu_fast.unlearn.experiment import run_experiment
    kw = dict(dataset="digits5", model="smallcnn", width=0.25, methods=["original", "finetune", "ppu", "eu-k"],
              train={"epochs": 1}, cache=False, log=None)
    a = run_experiment(seeds=[0], method_kwargs={"ppu": {"epochs": 1}}, **kw)
    b = run_experiment(seeds=[1], method_kwargs={"ppu": {"epochs": 1, "schedule": "fast", "lam": 1.0}}, **kw)
    used = a["config"]["method_options_used"]
    assert used["ppu"]["schedule"] == "fast" and used["finetune"]["lr"] == "0.01"  # a preset, resolved
    assert used == b["config"]["method_options_used"]
    res = merge([_write(tmp_path / "a", a), _write(tmp_path / "b", b)])
    assert res["config"]["seeds"] == [0, 1]
    c = json.loads(json.dumps(a, default=str))
    c["config"]["seeds"] = [2]
    c["config"]["method_options_used"]["finetune"]["lr"] = "0.05"  # another version's preset
    with pytest.raises(ValueError, match=r"method_options_used\[finetune\].lr: '0.05' vs '0.01'"):
        merge([tmp_path / "a", _write(tmp_path / "c", c)])


def test_out_of_memory_and_ctrl_c_end_with_a_status_not_a_traceback(tmp_path, capsys, monkeypatch):
    # A width whose model needs 576 GB: the allocator refuses it at once (nothing is touched).
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", "--width", "1e9",
                      "--methods", "ppu", "--seeds", "0", "--no-progress", "--out",
                      str(tmp_path / "o")], capsys)
    assert code == 3 and "error: out of memory" in err and "--width" in err
    from ppu_fast import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", "--seeds", "0",
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 130 and err.strip() == "ppu-fast run: interrupted"


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def _cache_setup(tmp_path, monkeypatch):
    from torch.utils.data import TensorDataset

    from ppu_fast.training import TrainConfig

    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g))
    torch.manual_seed(0)
    return _Net(), data, TrainConfig(epochs=2, batch_size=8, lr=0.1)


def test_the_cache_key_covers_the_models_code(tmp_path, monkeypatch):
    # Two versions of one file: the same module and class name, the same layers, another forward.
    import importlib.util

    from ppu_fast.training import cache_key

    _, data, cfg = _cache_setup(tmp_path, monkeypatch)
    keys = []
    for i, body in enumerate(("self.fc(x)", "2 * self.fc(x)")):
        src = tmp_path / f"v{i}" / "netmod.py"
        src.parent.mkdir()
        src.write_text("import torch\n\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                       "        super().__init__()\n        self.fc = torch.nn.Linear(4, 2)\n\n"
                       f"    def forward(self, x):\n        return {body}\n")
        spec = importlib.util.spec_from_file_location("netmod", src)
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "netmod", mod)
        spec.loader.exec_module(mod)
        torch.manual_seed(0)
        keys.append(cache_key(mod.Net(), data, cfg))
    assert keys[0] != keys[1]


def test_a_foreign_cache_file_does_not_seed_the_retraining(tmp_path, monkeypatch):
    # load_state_dict copies every matching tensor before it raises on an extra key: the model
    # trained after a refused file must start from the caller's weights, not the file's.
    from ppu_fast.training import fit_cached

    model, data, cfg = _cache_setup(tmp_path, monkeypatch)
    clean, meta = fit_cached(model, data, cfg, progress=False, cache=False)
    foreign = {"fc.weight": torch.full((2, 4), 3.0), "fc.bias": torch.zeros(2),
               "extra": torch.zeros(1)}
    path = tmp_path / "models" / (cache_key_of(model, data, cfg) + ".pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    for state in ({"state_dict": foreign, "seconds": 1.0},
                  {"state_dict": {k: v for k, v in foreign.items() if k != "extra"}},
                  {"state_dict": {k: v for k, v in foreign.items() if k != "extra"}, "seconds": None}):
        torch.save(state, path)
        again, meta = fit_cached(model, data, cfg, progress=False)
        assert not meta["cached"]
        assert torch.equal(again.fc.weight, clean.fc.weight)


def test_an_unwritable_cache_keeps_the_trained_model_and_says_so(tmp_path, monkeypatch):
    # The model was trained, then mkdir / save raised: a traceback after the training, exit
    # status 1 from the command line, the training lost (probe 28).
    from ppu_fast.training import fit_cached

    model, data, cfg = _cache_setup(tmp_path, monkeypatch)
    clean, _ = fit_cached(model, data, cfg, progress=False, cache=False)
    (tmp_path / "afile").write_text("a file where the cache folder should be")
    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path / "afile"))
    with pytest.warns(UserWarning, match=r"the trained model was not cached \(NotADirectoryError.*"
                                         r"PPU_FAST_CACHE to a writable folder, or pass "
                                         r"cache=False \(--no-cache\)"):
        trained, meta = fit_cached(model, data, cfg, progress=False)
    assert not meta["cached"] and meta["path"] is None
    assert torch.equal(trained.fc.weight, clean.fc.weight)
    # a models/ folder that exists but cannot be written: torch.save's writer raises RuntimeError
    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path / "ro"))
    (tmp_path / "ro" / "models").mkdir(parents=True)

    def refused(obj, f, *a, **k):
        raise RuntimeError(f"File {f} cannot be opened. open file failed with strerror: "
                           f"Permission denied")

    monkeypatch.setattr(torch, "save", refused)
    with pytest.warns(UserWarning, match=r"not cached \(RuntimeError: .*Permission denied"):
        trained, meta = fit_cached(model, data, cfg, progress=False)
    assert not meta["cached"] and torch.equal(trained.fc.weight, clean.fc.weight)
    assert list((tmp_path / "ro" / "models").iterdir()) == []


def cache_key_of(model, data, cfg):
    from ppu_fast.training import cache_key

    return cache_key(model, data, cfg)


def test_results_say_when_retrain_came_from_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PPU_FAST_CACHE", str(tmp_path / "cache"))
    argv = ["run", "--dataset", "digits5", "--model", "smallcnn", "--width", "0.25", "--epochs", "1",
            "--methods", "retrain", "--seeds", "0", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert first["per_seed"][0]["retrain"]["cached"] is False
    assert second["per_seed"][0]["retrain"]["cached"] is True
    assert "Retrain came from the model cache in 1 of 1 seed(s)" in (tmp_path / "b" / "results.md").read_text()
    assert "model cache" not in (tmp_path / "a" / "results.md").read_text()


def test_epochs_0_with_retrain_is_said(tmp_path, capsys):
    # Retrain is then the starting weights themselves (an --init-checkpoint the caller may have
    # trained on the forget set, or an untrained model), and every method is ranked against it.
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", "--width", "0.25",
                      "--epochs", "0", "--unlearn-epochs", "1", "--methods", "original,retrain,ppu",
                      "--seeds", "0", "--no-progress", "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and "warning: --epochs 0 with retrain in --methods" in err
    code, err = _run(["run", "--dataset", "digits5", "--model", "smallcnn", "--width", "0.25",
                      "--epochs", "0", "--unlearn-epochs", "1", "--methods", "original,ppu",
                      "--seeds", "0", "--no-progress", "--out", str(tmp_path / "p")], capsys)
    assert code == 0 and "warning" not in err


@pytest.mark.parametrize("flag, value", [("--pretrain-epochs", "-1"), ("--pretrain-per-class", "0"),
                                         ("--train-per-class", "0"), ("--test-per-class", "0")])
def test_size_flags_are_refused_by_their_own_name(flag, value, tmp_path, capsys):
    code, err = _run(["run", "--dataset", "cifar5", "--model", "smallcnn", flag, value, "--out",
                      str(tmp_path / "o")], capsys)
    assert code == 2 and f"argument {flag}: expected a positive integer" in err


def test_a_default_forget_count_too_large_for_a_reduced_split_says_so():
    from ppu_fast.data import make_split

    with pytest.raises(ValueError, match=r"num_forget=100 \(the default: none was given\) but class "
                                         r"5 has only \d+ training samples; expected num_forget "
                                         r"\(--num-forget\)"):
        make_split("digits", train_per_class=90, progress=False)


@pytest.mark.parametrize("kw,error,message", [
    # method options' values: each was refused only when its method ran
    ({"methods": ["original", "retrain", "scrub"], "method_kwargs": {"scrub": {"lr_decay": float("nan")}}},
     ValueError, r"method 'scrub': lr_decay=nan; expected a finite number"),
    ({"method_kwargs": {"ppu": {"lr": 1e300}}}, ValueError,
     r"method 'ppu': lr must be a positive finite number \(at most 3.4e\+38\), got 1e\+300"),
    ({"method_kwargs": {"ppu": {"momentum": 1.5}}}, ValueError,
     r"method 'ppu': momentum must be in \[0, 1\), got 1.5"),
    ({"method_kwargs": {"finetune": {"epochs": 2.5}}}, ValueError, r"epochs=2.5; expected an integer"),
    ({"methods": ["original", "scrub"], "method_kwargs": {"scrub": {"lr_milestones": [2.5]}}},
     ValueError, r"lr_milestones: 2.5 is not an epoch"),
    ({"variants": {"ppu[x]": ("ppu", {"weight_decay": -1.0})}, "methods": ["original", "ppu[x]"]},
     ValueError, r"method 'ppu\[x\]': weight_decay must be a finite number >= 0"),
    # options for a method not run: dropped, yet recorded
    ({"method_kwargs": {"scrub": {"lr": 0.1}}}, ValueError, r"method_kwargs: 'scrub' not in methods"),
    # the training's fields: after any pre-training, or never (NaN trained to the end)
    ({"train": {"lr": float("nan")}, "pretrain": "cifar10-other"}, ValueError,
     r"train: lr must be a positive finite number"),
    ({"train": {"momentum": 1.5}}, ValueError, r"train: momentum must be in \[0, 1\)"),
    ({"train": {"augment": "no"}}, ValueError, r"train: augment must be True or False, got 'no'"),
    ({"train": {"seed": 3}}, ValueError, r"train: 'seed' is set per run by seeds"),
    ({"pretrain": "cifar10-other", "pretrain_train": {"epochs": -1}}, ValueError,
     r"pretrain_train: epochs must be >= 0"),
    # never refused: the CLI's checks, not the API's
    ({"methods": []}, ValueError, r"methods: none named"),
    ({"pretrain_per_class": 3}, ValueError, r"pretrain_per_class: only with pretrain"),
    ({"log": 5}, TypeError, r"log: expected a callable"),
    # before decoding the split (minutes for CIFAR-10), or never (inf overflowed in int())
    ({"width": float("inf")}, ValueError, r"width must be a positive finite number, got inf"),
    ({"width": "1"}, ValueError, r"width must be a positive finite number, got '1'"),
    ({"dataset": "cifar10", "pretrain": "cifar10-other"}, ValueError,
     r"dataset 'cifar10' leaves no CIFAR-10 classes free"),
    # the attack's non-members are the forget classes' test images, not the whole test set
    ({"dataset": "digits", "test_per_class": 2}, ValueError,
     r"the split: \d+ forget and 2 test examples of the forget classes"),
    # what a method refused when it ran, after the Original (and the methods before it)
    # trained: the setting, the presets' values, option combinations, a composite's steps
    ({"methods": ["original", "finetune"], "method_kwargs": {"finetune": {"setting": "bogus"}}},
     ValueError, r"method 'finetune': setting must be 'auto' or one of"),
    ({"methods": ["original", "scrub"], "method_kwargs": {"scrub": {"epochs": 2}}}, ValueError,
     r"method 'scrub': msteps must be in \[0, epochs=2\], got 3 \(the 'small' preset's"),
    ({"methods": ["original", "scrub+r"], "method_kwargs": {"scrub+r": {"optimizer": "x"}}},
     ValueError, r"method 'scrub\+r': optimizer must be 'sgd' or 'adam'"),
    ({"method_kwargs": {"ppu": {"history": False}}}, ValueError,
     r"method 'ppu': history=False with select='val'"),
    ({"method_kwargs": {"ppu": {"trainable": "bogus"}}}, ValueError,
     r"method 'ppu': trainable: unknown value 'bogus'"),
    ({"method_kwargs": {"ppu": {"marginals": "bogus"}}}, ValueError,
     r"method 'ppu': marginals: unknown name 'bogus'"),
    ({"method_kwargs": {"ppu": {"backend": "bogus"}}}, ValueError,
     r"method 'ppu': backend: unknown name 'bogus'"),
    ({"methods": ["original", "ppu-bias"], "method_kwargs": {"ppu-bias": {"forget_repeats": 0}}},
     ValueError, r"method 'ppu-bias': forget_repeats must be a positive int"),
    ({"methods": ["original", "scrub+ppu"],
      "method_kwargs": {"scrub+ppu": {"scrub_options": {"bogus": 1}}}}, TypeError,
     r"method 'scrub\+ppu': scrub_options: unlearning method 'scrub' got unknown option\(s\) bogus"),
    ({"methods": ["original", "scrub+ppu"],
      "method_kwargs": {"scrub+ppu": {"ppu_options": {"lr": float("nan")}}}}, ValueError,
     r"method 'scrub\+ppu': ppu_options: unlearn\(method='ppu-bias'\): lr=nan"),
    ({"methods": ["original", "finetune+ppu"],
      "method_kwargs": {"finetune+ppu": {"finetune_options": {"setting": "x"}}}}, ValueError,
     r"method 'finetune\+ppu': finetune_options: setting must be"),
    # accepted before, stepping against the scrubbing direction
    ({"methods": ["original", "ntk"], "method_kwargs": {"ntk": {"scale": -1.0}}}, ValueError,
     r"method 'ntk': scale must be 'predicted' or a finite number >= 0, got -1.0"),
    # the other baselines' option checks, made when each method ran
    ({"methods": ["original", "fisher"], "method_kwargs": {"fisher": {"alpha": -1.0}}}, ValueError,
     r"method 'fisher': alpha must be >= 0, got -1.0"),
    ({"methods": ["original", "bad-t"], "method_kwargs": {"bad-t": {"temperature": 0.0}}},
     ValueError, r"method 'bad-t': temperature must be positive"),
    ({"methods": ["original", "bad-t"],
      "method_kwargs": {"bad-t": {"variant": "chundawat", "forget_batch_size": 8}}}, ValueError,
     r"method 'bad-t': forget_batch_size applies to variant='scrub' only"),
    ({"methods": ["original", "neggrad+"], "method_kwargs": {"neggrad+": {"alpha": 1.5}}},
     ValueError, r"method 'neggrad\+': alpha must be in \[0, 1\], got 1.5"),
    ({"methods": ["original", "cf-k"], "method_kwargs": {"cf-k": {"lr_decayed_base": -1.0}}},
     ValueError, r"method 'cf-k': lr_decayed_base must be a positive finite number or None"),
    ({"methods": ["original", "finetune"], "method_kwargs": {"finetune": {"epochs": 0}}},
     ValueError, r"method 'finetune': epochs must be a positive int, got 0"),
    ({"methods": ["original", "scrub"], "method_kwargs": {"scrub": {"batch_size": 0}}},
     ValueError, r"method 'scrub': batch_size must be a positive int, got 0"),
    ({"methods": ["original", "retrain"], "method_kwargs": {"retrain": {"config": 5}}},
     TypeError, r"method 'retrain': config must be a ppu_fast.training.TrainConfig"),
    # what reads the architecture: checked on an untrained model of it
    ({"methods": ["original", "cf-k"], "method_kwargs": {"cf-k": {"layers": ["nope"]}}},
     ValueError, r"method 'cf-k': layers: the model has no module 'nope'"),
    ({"methods": ["original", "cf-k"], "method_kwargs": {"cf-k": {"layers": ["features.0.2"]}}},
     ValueError, r"method 'cf-k': layers: 'features.0.2' hold no parameters"),
    ({"methods": ["original", "eu-k"], "method_kwargs": {"eu-k": {"reset": ["features.3"]}}},
     ValueError, r"method 'eu-k': reset: 'features.3' hold no parameters"),
    # accepted before: zeroed the classifier row the retained examples of class 0 need
    ({"methods": ["original", "fisher"], "method_kwargs": {"fisher": {"setting": "class"}}},
     ValueError, r"method 'fisher': setting='class' zeroes the classifier rows"),
    # PPU's tensors against the split and the model's classes (read when PPU ran, after training)
    ({"methods": ["original", "ppu"],
      "method_kwargs": {"ppu": {"pseudo": torch.full((3, 5), 0.2)}}},
     ValueError, r"method 'ppu': pseudo: shape \(3, 5\); expected \(N_forget, k\) = \(25, 5\)"),
    ({"methods": ["original", "ppu"], "method_kwargs": {"ppu": {"marginals": torch.ones(5)}}},
     ValueError, r"method 'ppu': marginals: sum to 5; expected N = "),
    ({"methods": ["original", "ppu-bias"],
      "method_kwargs": {"ppu-bias": {"pseudo": torch.full((25, 4), 0.25)}}},
     ValueError,
     r"method 'ppu-bias': pseudo: shape \(25, 4\); expected \(N_forget, k\) = \(25, 5\)"),
])
def test_run_experiment_refuses_before_any_training(monkeypatch, kw, error, message):
    """Each bad value is refused before the Original trains (a helper's hunt: ~600 of 914 probes
    were refused only after training, some never)."""
    import ppu_fast.training as training
    from ppu_fast.unlearn.experiment import run_experiment

    def no_training(*a, **k):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(training, "fit", no_training)
    with pytest.raises(error, match=message):
        run_experiment(**{"cache": False, "progress": False, "log": None, **kw})


def test_run_experiment_checks_the_backend_variables_before_training(monkeypatch):
    """PPU_FAST_BACKEND is read by PPU's refine, after Original and Retrain: checked up front when
    a method refines (as the command line already did), and not otherwise."""
    import ppu_fast.training as training
    from ppu_fast.unlearn.experiment import run_experiment

    def no_training(*a, **k):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(training, "fit", no_training)
    monkeypatch.setenv("PPU_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="PPU_FAST_BACKEND: unknown backend name 'nope'"):
        run_experiment(methods=["original", "retrain", "finetune+ppu"], cache=False, log=None)
    with pytest.raises(AssertionError, match="trained before refusing"):
        run_experiment(methods=["original", "retrain"], cache=False, log=None)
