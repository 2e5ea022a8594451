"""Torch state a caller may have set around a call (probe 29): a default device other than the
CPU, another default dtype, no_grad / inference_mode, the global RNG. The package's answer must
be the one it gives with torch's defaults, and the caller's state must be as it was."""
import contextlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import ppu_fast
from ppu_fast import metrics
from ppu_fast.finetune import finetune
from ppu_fast.torch_defaults import cpu_default_device, training_grad_mode

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(n=600, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(n, k, generator=g), dim=1)
    forget = torch.zeros(n, dtype=torch.bool)
    forget[: n // 10] = True
    return p, forget


@contextlib.contextmanager
def _default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("pseudo", [None, "uniform", "random", "prior"])
def test_refine_under_a_meta_default_device_is_the_plain_answer(backend, pseudo):
    # cpu: prepare's result buffer took the default device and the C++ code wrote through a null
    # pointer (a segmentation fault); other paths raised "Cannot copy out of meta tensor".
    p, forget = _problem()
    kw = dict(pseudo=pseudo, backend=backend)
    want = ppu_fast.refine(p, forget, generator=torch.Generator().manual_seed(1), **kw)
    with torch.device("meta"):
        assert torch.get_default_device().type == "meta"
        got = ppu_fast.refine(p, forget, generator=torch.Generator(device="cpu").manual_seed(1),
                              **kw)
        assert torch.get_default_device().type == "meta"  # the caller's default is back
    assert got.device.type == "cpu" and torch.equal(got, want)


def test_solve_targets_refine_file_and_numpy_under_a_meta_default_device(tmp_path):
    p, forget = _problem()
    q_np = ppu_fast.refine(p.numpy(), forget.numpy())
    log_p = p.log()
    w = torch.full((p.shape[0],), 1.0)
    alpha, info = ppu_fast.solve(log_p, w, p.sum(0, dtype=torch.float64))
    t = ppu_fast.targets(log_p, w, alpha)
    np.save(tmp_path / "p.npy", p.numpy())
    with torch.device("meta"):
        assert np.array_equal(ppu_fast.refine(p.numpy(), forget.numpy()), q_np)
        a2, _ = ppu_fast.solve(log_p, w, p.sum(0, dtype=torch.float64))
        t2 = ppu_fast.targets(log_p, w, a2)
        ppu_fast.refine_file(tmp_path / "p.npy", forget.numpy(), tmp_path / "q.npy",
                             chunk_rows=200, progress=False)
    assert torch.equal(a2, alpha) and torch.equal(t2, t) and info.converged
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), q_np, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_seeded_random_pseudo_does_not_follow_the_default_dtype(dtype):
    # The draws were made in the default dtype: another Q (0.77 apart) from the same generator.
    p, forget = _problem()
    want = ppu_fast.refine(p, forget, pseudo="random", generator=torch.Generator().manual_seed(3))
    with _default_dtype(dtype):
        got = ppu_fast.refine(p, forget, pseudo="random",
                              generator=torch.Generator().manual_seed(3))
    assert got.dtype == torch.float32 and torch.equal(got, want)


def _toy(n=48, d=5, k=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    torch.manual_seed(0)
    return nn.Linear(d, k), TensorDataset(x, y), torch.softmax(torch.randn(n, k, generator=g), 1)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_finetune_and_unlearn_train_inside_a_callers_no_grad(mode):
    # Every backward failed: "element 0 of tensors does not require grad".
    model, data, targets = _toy()
    want = finetune(model, data, targets, epochs=2, progress=False).model.weight
    forget, retain = torch.utils.data.Subset(data, range(8)), torch.utils.data.Subset(data, range(8, 48))
    want_u = ppu_fast.unlearn(model, forget, retain, method="ppu-bias", epochs=1, seed=0,
                              progress=False).model.weight
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        got = finetune(model, data, targets, epochs=2, progress=False).model.weight
        got_u = ppu_fast.unlearn(model, forget, retain, method="ppu-bias", epochs=1, seed=0,
                                 progress=False).model.weight
        # the caller's mode is back
        assert not torch.is_grad_enabled()
        assert torch.is_inference_mode_enabled() == (mode == "inference_mode")
    assert torch.equal(got, want) and torch.equal(got_u, want_u)


def test_the_decorators_push_a_mode_only_when_needed():
    # The CPU default-device mode only around the solver's calls and only under another default;
    # the training calls never push it (the caller's model and callbacks run inside them).
    seen = []

    def probe():
        seen.append((torch.get_default_device().type, torch.is_grad_enabled(),
                     torch.is_inference_mode_enabled(), torch._C._len_torch_function_stack()))

    cpu_default_device(probe)()
    training_grad_mode(probe)()
    with torch.device("meta"), torch.inference_mode():
        depth = torch._C._len_torch_function_stack()
        cpu_default_device(probe)()
        training_grad_mode(probe)()
    assert seen == [("cpu", True, False, 0)] * 2 + [("cpu", False, True, depth + 1),
                                                     ("meta", True, False, depth)]


def test_warnings_name_the_callers_line():
    # A fixed stacklevel named the decorator's line once refine was wrapped: every call site then
    # shared one warning location (and Python's once-per-location default hid all but the first).
    import warnings

    p, forget = _problem()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ppu_fast.refine(p, forget, max_iter=1)
    assert [x.category for x in w] == [ppu_fast.ConvergenceWarning] and w[0].filename == __file__
    model, data, targets = _toy()
    mask = torch.zeros(48, dtype=torch.bool)
    mask[:8] = True
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        finetune(model, data, targets, epochs=1, forget_mask=mask, retain_per_epoch=100,
                 progress=False)
    assert "retain_per_epoch=100" in str(w[0].message) and w[0].filename == __file__


def test_seeded_metrics_leave_the_global_rng_alone():
    # Each DataLoader iterator drew its base seed from the global torch RNG (scikit-learn leaves
    # the global state alone when random_state is given).
    model, data, _ = _toy()
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    metrics.mia(model, data, data, seed=0)
    metrics.error(model, data)
    metrics.lira(model, data, data)
    assert torch.equal(torch.rand(3), want)


def test_metrics_read_a_random_sampler_without_drawing_from_it():
    # Reading which examples a caller's loader visits is not an iteration of it: the global RNG
    # and the sampler's own generator are as they were (the set scored is the one the loader's
    # next iteration visits).
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SubsetRandomSampler

    model, data, _ = _toy()
    idx = list(range(0, 48, 3))
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    metrics.error(model, DataLoader(data, sampler=SubsetRandomSampler(idx), batch_size=4))
    assert torch.equal(torch.rand(3), want)
    gen = torch.Generator().manual_seed(1)
    sampler = RandomSampler(data, num_samples=10, generator=gen)
    state = gen.get_state()
    metrics.error(model, DataLoader(data, sampler=sampler, batch_size=4))
    assert torch.equal(gen.get_state(), state)

    class Batches(BatchSampler):  # a caller's batch sampler over a random sampler
        pass

    batches = Batches(RandomSampler(data, num_samples=8, generator=gen), 4, False)
    metrics.error(model, DataLoader(data, batch_sampler=batches))
    assert torch.equal(gen.get_state(), state)


def test_the_refine_cli_under_a_cuda_default_device_in_sitecustomize_style(tmp_path):
    # torch.set_default_device at start-up (as a notebook or LLM script does) before the CLI's
    # refine, on a machine without CUDA: "meta" stands in; the CPU kernels segfaulted.
    p, forget = _problem()
    np.save(tmp_path / "p.npy", p.numpy())
    np.save(tmp_path / "m.npy", forget.numpy())
    code = ("import sys, torch; torch.set_default_device('meta'); from ppu_fast.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "refine", "--probs", str(tmp_path / "p.npy"),
                        "--forget", str(tmp_path / "m.npy"), "--out", str(tmp_path / "q.npy")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), ppu_fast.refine(p, forget).numpy(),
                               atol=2e-6)


def _image_toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    data = TensorDataset(x, y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    parts = [torch.utils.data.Subset(data, r) for r in (range(8), range(8, 48), range(48, 60))]
    return model, data, parts


def test_optimiser_steps_run_with_the_cpu_as_default_device():
    # torch 2.11 (the GPU machines') made Adam's step counter with the default device: under
    # "meta" the step failed, under "cuda" the counter sat on the GPU. Every step that makes
    # state (all but plain SGD's) runs with the CPU as the default, whatever the caller's.
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from ppu_fast.unlearn.experiment import warm_up

    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append((type(opt).__name__,
                                               torch.get_default_device().type)))
    model, data, (forget, retain, val) = _image_toy()
    targets = torch.softmax(torch.randn(60, 3, generator=torch.Generator().manual_seed(1)), 1)
    try:
        with torch.device("meta"):
            finetune(model, data, targets, epochs=1, batch_size=16, optimizer="adam",
                     progress=False)
            ppu_fast.unlearn(model, forget, retain, method="scrub", val=val, seed=0,
                             progress=False)
            warm_up()
    finally:
        handle.remove()
    adam = [dev for name, dev in seen if name == "Adam"]
    assert len(adam) > 3 and set(adam) == {"cpu"}, seen


@pytest.mark.parametrize("method,options", [("ppu", {}), ("ppu-bias", {}), ("finetune", {}),
                                            ("scrub", {}), ("bad-t", {}), ("neggrad+", {}),
                                            ("retrain", {"cache": False}), ("fisher", {}),
                                            ("cf-k", {"layers": ["1"]})])
def test_unlearn_under_a_meta_default_device_is_the_plain_answer(method, options):
    # torch.set_default_device("cuda") in the caller's program (meta stands in: CI has no GPU):
    # torch's DataLoader drew its order and base seed with our CPU generator into tensors made
    # on the default device ("Expected a 'cuda' device type for generator", pytorch#110820), and
    # our own masks and label tensors followed the default device; every training call failed.
    # The model is the caller's (on the CPU here) and runs under the caller's default.
    model, _, (forget, retain, val) = _image_toy()
    want = ppu_fast.unlearn(model, forget, retain, method=method, val=val, seed=0,
                            progress=False, **options).model.state_dict()
    with torch.device("meta"):
        got = ppu_fast.unlearn(model, forget, retain, method=method, val=val, seed=0,
                               progress=False, **options).model.state_dict()
        assert torch.get_default_device().type == "meta"
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_fit_finetune_and_metrics_under_a_meta_default_device_are_the_plain_answer():
    from ppu_fast import training
    model, data, (forget, retain, val) = _image_toy()
    targets = torch.softmax(torch.randn(60, 3, generator=torch.Generator().manual_seed(1)), 1)
    cfg = training.TrainConfig(epochs=2, batch_size=16, augment=False)

    def run():
        fitted = training.fit(copy_of(model), data, cfg, progress=False)
        tuned = finetune(model, data, targets, epochs=2, batch_size=16, progress=False).model
        # Adam: torch 2.11 (the GPU machines') made its step counter on the default device.
        adam = finetune(model, data, targets, epochs=1, batch_size=16, optimizer="adam",
                        progress=False).model
        # A caller's loader with a random sampler: its draws are read, on the CPU.
        sampler = torch.utils.data.SubsetRandomSampler(
            range(30), generator=torch.Generator().manual_seed(2))
        drawn = torch.utils.data.DataLoader(data, batch_size=5, sampler=sampler)
        return ([fitted.state_dict(), tuned.state_dict(), adam.state_dict()],
                [metrics.error(model, val), metrics.mia(model, forget, val, seed=0),
                 metrics.error(model, torch.utils.data.DataLoader(val, batch_size=5)),
                 metrics.error(model, drawn)])

    want_sd, want_m = run()
    with torch.device("meta"):
        got_sd, got_m = run()
    assert all(torch.equal(w[k], g[k]) for w, g in zip(want_sd, got_sd) for k in w)
    assert got_m == want_m


def copy_of(model):
    import copy
    return copy.deepcopy(model)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_augment_batch_draws_the_same_under_other_torch_defaults(dtype):
    # The flip draw followed the default dtype (a float64 default flipped other images for the
    # same seed) and, under a meta default device, failed.
    from ppu_fast.training import augment_batch
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    want = augment_batch(x, torch.Generator().manual_seed(5))
    with _default_dtype(dtype):
        got = augment_batch(x, torch.Generator().manual_seed(5))
    with torch.device("meta"):
        got_meta = augment_batch(x, torch.Generator().manual_seed(5))
    assert torch.equal(got, want) and torch.equal(got_meta, want)


def test_the_cpu_draw_loader_gives_torchs_order_under_any_default_device():
    from ppu_fast.data import CpuDrawLoader
    data = TensorDataset(torch.arange(50.0), torch.arange(50))
    plain = [y.tolist() for _, y in torch.utils.data.DataLoader(
        data, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(3))]
    ours = CpuDrawLoader(data, batch_size=7, shuffle=True,
                         generator=torch.Generator().manual_seed(3))
    assert [y.tolist() for _, y in ours] == plain
    ours = CpuDrawLoader(data, batch_size=7, shuffle=True,
                         generator=torch.Generator().manual_seed(3))
    with torch.device("meta"):
        it = iter(ours)
        assert len(it) == 8
        batches = [y for _, y in it]
        assert torch.get_default_device().type == "meta"
    assert all(b.device.type == "cpu" for b in batches)
    assert [b.tolist() for b in batches] == plain


_PRECISION_KNOBS = [("backends", ()), ("cuda.matmul", ("cuda", "matmul")), ("mkldnn", ("mkldnn",)),
                    ("mkldnn.matmul", ("mkldnn", "matmul")), ("cudnn", ("cudnn",))]


def _knob(path):
    """The torch.backends object at ``path`` (None where this torch lacks it)."""
    obj = torch.backends
    for part in path:
        obj = getattr(obj, part, None)
    return obj


def _precision_state():
    """Every float32-precision setting torch has (None where this torch lacks it), and what the
    older global getter says (or that it raises)."""
    out = {name: getattr(_knob(path), "fp32_precision", None) for name, path in _PRECISION_KNOBS}
    for name, read in (("legacy", torch.get_float32_matmul_precision),
                       ("cublas tf32", getattr(torch._C, "_get_cublas_allow_tf32", None))):
        try:
            out[name] = read() if read is not None else None
        except RuntimeError as e:
            out[name] = f"raises: {str(e)[:40]}"
    return out


def _set_precision(setting):
    if setting == "legacy high":
        torch.set_float32_matmul_precision("high")
    elif setting == "tf32, the newer way":
        # As in a fresh process: the per-backend settings inherit ("none") from the global one.
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
    elif setting == "cuda matmul tf32":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif setting == "onednn matmul bf16":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    elif setting == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True


PRECISION_SETTINGS = ["default", "legacy high", "allow_tf32", "tf32, the newer way",
                      "cuda matmul tf32", "onednn matmul bf16"]


def _restore_precision(pristine):
    torch.set_float32_matmul_precision("highest")
    for name, path in _PRECISION_KNOBS:
        obj = _knob(path)
        if obj is not None and hasattr(obj, "fp32_precision"):
            obj.fp32_precision = pristine[name]
    assert _precision_state() == pristine


@pytest.mark.parametrize("setting", PRECISION_SETTINGS)
def test_ieee_matmul_agrees_with_every_check_torch_makes(setting):
    """Inside ``ieee_matmul`` both of torch's records say full float32 precision and agree, so
    neither its global getter nor cuBLAS's TF32 check (what a float32 matmul on a GPU asks; it
    raises where the two disagree) fails; after it, every setting reads as before, raising or not.
    (With only the per-backend setting made "ieee", a caller's set_float32_matmul_precision("high")
    or allow_tf32 = True made cuBLAS's check raise inside: every dense Hessian on a GPU failed.)"""
    from ppu_fast.backends.base import ieee_matmul

    if setting != "default" and not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has the older global setting only")
    pristine = _precision_state()
    try:
        _set_precision(setting)
        before = _precision_state()
        with ieee_matmul():
            inside = _precision_state()
        assert _precision_state() == before
    finally:
        _restore_precision(pristine)
    assert inside["legacy"] == "highest"
    assert inside["cublas tf32"] in (False, None)
    assert inside["cuda.matmul"] in ("ieee", None) and inside["mkldnn.matmul"] in ("ieee", None)


@pytest.mark.parametrize("setting", PRECISION_SETTINGS)
def test_dense_hessians_under_any_float32_precision_setting(setting):
    """A caller that turned TF32 (or oneDNN's bf16) on, the old way or the newer per-backend
    way: the Hessian's float32 products (the torch reference's, and the GPU backends' W by
    chunks) still run in full precision, give the default answer, and leave every setting as
    the caller had it. (Set the newer way, TF32 made the older global getter raise inside the
    call: a refine at k = 40 failed with "mix of the legacy and new APIs".)"""
    from ppu_fast.backends.base import sampled_gram_by_chunks
    from ppu_fast.backends.torch_ref import q_chunk

    if setting != "default" and not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has the older global setting only")
    p, forget = _problem(n=3000, k=40, seed=3)
    log_p = torch.log(p)
    inv_c = torch.ones(3000)

    def rows(lp, ic, out):
        out.copy_(q_chunk(lp, ic, torch.zeros(40, dtype=torch.float64)))

    want_q = ppu_fast.refine(p, forget, backend="torch")
    want_w = sampled_gram_by_chunks(rows, log_p, inv_c, stride=1)
    pristine = _precision_state()
    try:
        _set_precision(setting)
        before = _precision_state()
        q, info = ppu_fast.refine(p, forget, backend="torch", return_info=True)
        w = sampled_gram_by_chunks(rows, log_p, inv_c, stride=1)
        assert _precision_state() == before
    finally:
        _restore_precision(pristine)
    assert info.converged and torch.equal(q, want_q)
    assert torch.equal(w, want_w)


def _queued_gpu_seed():
    """The seed torch.manual_seed queued for GPUs CUDA has not started (torch's own record of it:
    private, hence the skip where it is missing)."""
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    if tracker is None or torch.cuda.is_initialized():
        pytest.skip("this torch keeps no lazy GPU seed (or CUDA has started)")
    call = tracker.get_calls()[1]
    if call is None:
        return None
    cb = call[0]
    return dict(zip(cb.__code__.co_freevars, (c.cell_contents for c in cb.__closure__)))["seed"]


def test_the_seed_queued_for_gpus_not_started_is_the_callers():
    """torch.manual_seed also queues its seed for GPUs that CUDA has not started, which a fork of
    the random state cannot restore: a caller on a GPU machine who seeded torch, called the
    library on the CPU and then moved to the GPU drew from the library's seed there. The calls
    that seed for their own draws leave the queued seed as the caller set it."""
    from ppu_fast.training import TrainConfig, fit

    torch.manual_seed(123)
    assert _queued_gpu_seed() == 123
    x, y = torch.randn(40, 6), torch.arange(40) % 3
    data = TensorDataset(x, y)
    finetune(nn.Linear(6, 3), data, torch.full((40, 3), 1 / 3), epochs=1, seed=7, progress=False)
    assert _queued_gpu_seed() == 123
    forget, retain = TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:])
    for method, extra in (("neggrad+", {}), ("ppu", {}), ("scrub", {"msteps": 1}),
                          ("eu-k", {"layers": ["2"]})):
        ppu_fast.unlearn(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), forget,
                         retain, method=method, seed=9, epochs=1, progress=False, **extra)
        assert _queued_gpu_seed() == 123, method
    fit(nn.Linear(6, 3), data, TrainConfig(epochs=1, seed=11), progress=False)
    assert _queued_gpu_seed() == 123


def test_overlapping_blocks_in_threads_restore_the_callers_setting():
    """Two threads' refines overlap in ``ieee_matmul``: the one still inside keeps full precision
    when the other leaves, and the caller's setting comes back when both have left (each block
    saved and restored its own, so the first to leave put "medium" back under the other and the
    last left "highest" behind for good)."""
    import threading
    from ppu_fast.backends.base import ieee_matmul

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with ieee_matmul():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with ieee_matmul():
            b_in.set()
            a_out.wait(10)
            seen["b after a left"] = torch.get_float32_matmul_precision()

    try:
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen == {"b after a left": "highest"}
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


_FORK_SCRIPT = r'''
import os, signal, sys
import numpy as np, torch, ppu_fast
torch.set_num_threads(2)
torch.log_softmax(torch.randn(400_000, 10), dim=1)  # the parent's OpenMP team exists now
rng = np.random.default_rng(0)
n, k = 50_000, 10
p = rng.random((n, k)); p /= p.sum(1, keepdims=True)
mask = np.zeros(n, bool); mask[::5] = True
p32 = torch.from_numpy(p.astype(np.float32))
calls = {
    "float16": lambda: ppu_fast.refine(p32.half(), mask),
    "weights": lambda: ppu_fast.refine(p32, mask, weights=np.full(n, 0.5)),
    "random": lambda: ppu_fast.refine(p32, mask, pseudo="random",
                                      generator=torch.Generator().manual_seed(0)),
    "solve": lambda: ppu_fast.solve(torch.log(p32), np.ones(n), p.sum(0))[0],
    "uniform": lambda: ppu_fast.refine(p32, mask),
}
want = {name: f() for name, f in calls.items()}
for name, f in calls.items():
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)  # a hang ends the child with SIGALRM
        if name != "uniform":
            torch.set_num_threads(1)  # the documented advice for a forked child
        got = f()
        # numpy compares: torch.equal is itself a parallel torch op.
        os._exit(0 if np.array_equal(got.numpy(), want[name].numpy()) else 3)
    _, status = os.waitpid(pid, 0)
    print(name, os.waitstatus_to_exitcode(status), flush=True)
'''


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no os.fork here")
def test_forked_children_finish_as_docs_design_says():
    """docs/design.md ("Threads, processes"): after the parent ran parallel torch ops, a forked
    child that sets one torch thread finishes every call with the parent's answer (the 16-bit,
    weights=, random pseudo and solve paths run torch ops, which hang in libgomp otherwise); a
    float32 refine with the default uniform pseudo runs none, and finishes on two threads (a
    fresh pool in the child)."""
    run = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.split()
    assert dict(zip(lines[::2], lines[1::2])) == {
        name: "0" for name in ("float16", "weights", "random", "solve", "uniform")}, run.stdout
