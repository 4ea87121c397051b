"""Muon's keys: muon_split_qkv (c_attn's queries, keys and values orthogonalised apart) and muon_weight_decay."""

import torch
import torch.optim._muon as muon_module

import train as train_script
from glimpse.optim import configure_optimizer, newton_schulz_float32, set_lr
from glimpse.runtime import cpu_computes_bfloat16
from model import GPT
from tests.conftest import CLOCKED, tiny_config, train_config
from tests.test_reliability import run_main
from tests.test_train import read_metrics
from train import TrainConfig, train

SHAPE = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, optimizer="muon")


def muon_matrices(model: GPT) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters()
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) and ".h." in name}


def take_steps(model: GPT, optimizer, cfg: TrainConfig, grads: list[dict[str, torch.Tensor]]):
    """Steps of the optimizer at a third of the peak rate, each with the given gradients (the rest zero)."""
    for step_grads in grads:
        for name, p in model.named_parameters():
            p.grad = step_grads[name].clone() if name in step_grads else torch.zeros_like(p)
        set_lr(optimizer, cfg.learning_rate / 3, cfg)
        optimizer.step()


def test_split_qkv_steps_queries_keys_and_values_as_torchs_muon_steps_three_matrices():
    cfg = train_config(**SHAPE, muon_split_qkv=True, muon_weight_decay=0.05)
    torch.manual_seed(0)
    model = GPT(cfg.model_config(vocab_size=20))
    start = {name: p.detach().clone() for name, p in muon_matrices(model).items()}
    C = cfg.model.n_embd
    grads = [{name: torch.randn_like(p) for name, p in muon_matrices(model).items()} for _ in range(3)]
    optimizer = configure_optimizer(model, cfg, torch.device("cpu"))
    optimizer.muon.float32_ns = False  # torch's own precision, to compare bit for bit (float32: the test below)
    take_steps(model, optimizer, cfg, grads)

    # torch's own Muon, each c_attn given as three C x C parameters (queries, keys, values) with their gradients
    parts = {(name, i): torch.nn.Parameter(w[i * C:(i + 1) * C].clone() if "c_attn" in name else w.clone())
             for name, w in start.items() for i in range(3 if "c_attn" in name else 1)}
    reference = torch.optim.Muon(list(parts.values()), lr=cfg.muon_lr / 3, momentum=cfg.muon_momentum,
                                 ns_steps=cfg.muon_ns_steps, weight_decay=cfg.muon_weight_decay)
    for step_grads in grads:
        for (name, i), p in parts.items():
            p.grad = step_grads[name][i * C:(i + 1) * C].clone() if "c_attn" in name else step_grads[name].clone()
        reference.step()
    for name, p in muon_matrices(model).items():
        expected = torch.cat([parts[name, i].detach() for i in range(3 if "c_attn" in name else 1)])
        assert torch.equal(p.detach(), expected), name

    # the whole-matrix update (the default) differs for c_attn alone
    whole = GPT(cfg.model_config(vocab_size=20))
    whole.load_state_dict({**whole.state_dict(), **start})
    unsplit = train_config(**SHAPE, muon_weight_decay=0.05)
    optimizer = configure_optimizer(whole, unsplit, torch.device("cpu"))
    optimizer.muon.float32_ns = False
    take_steps(whole, optimizer, unsplit, grads)
    for name, p in muon_matrices(whole).items():
        assert torch.equal(p.detach(), muon_matrices(model)[name].detach()) != ("c_attn" in name), name


def test_muons_momentum_and_iterations_are_the_configs():
    """muon_momentum and muon_ns_steps reach Muon: three steps equal torch's Muon given the same settings, and
    differ from its defaults (0.95, 5), which a Muon built without them would silently use."""
    cfg = train_config(**SHAPE, muon_momentum=0.6, muon_ns_steps=2)
    torch.manual_seed(0)
    model = GPT(cfg.model_config(vocab_size=20))
    start = {name: p.detach().clone() for name, p in muon_matrices(model).items()}
    grads = [{name: torch.randn_like(p) for name, p in muon_matrices(model).items()} for _ in range(3)]
    optimizer = configure_optimizer(model, cfg, torch.device("cpu"))
    optimizer.muon.float32_ns = False  # torch's own precision, to compare bit for bit
    take_steps(model, optimizer, cfg, grads)
    for settings, same in ((dict(momentum=0.6, ns_steps=2), True), ({}, False)):
        copies = {name: torch.nn.Parameter(w.clone()) for name, w in start.items()}
        reference = torch.optim.Muon(list(copies.values()), lr=cfg.muon_lr / 3, weight_decay=cfg.muon_weight_decay,
                                     **settings)
        for step_grads in grads:
            for name, p in copies.items():
                p.grad = step_grads[name].clone()
            reference.step()
        for name, p in muon_matrices(model).items():
            assert torch.equal(p.detach(), copies[name].detach()) == same, (settings, name)


def test_muon_weight_decay_is_muons_own_and_weight_decay_adamws():
    """With zero gradients a step only decays: Muon's matrices by the step's Muon rate times muon_weight_decay,
    AdamW's by its rate times weight_decay, vectors not at all."""
    cfg = train_config(**SHAPE, tie_embeddings=False, weight_decay=0.1, muon_weight_decay=0.3)
    model = GPT(cfg.model_config(vocab_size=20))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    take_steps(model, configure_optimizer(model, cfg, torch.device("cpu")), cfg, [{}])
    muon = muon_matrices(model)
    for name, p in model.named_parameters():
        if name in muon:
            shrink = 1 - cfg.muon_lr / 3 * cfg.muon_weight_decay
        elif p.dim() >= 2:
            shrink = 1 - cfg.learning_rate / 3 * cfg.weight_decay
        else:
            shrink = 1.0
        torch.testing.assert_close(p.detach(), before[name] * shrink, rtol=1e-6, atol=0, msg=name)
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(before) - set(muon)


def test_a_negative_muon_weight_decay_is_a_one_line_error(tmp_path, capsys):
    message = run_main(train_script.main, [f"--out_dir={tmp_path}", "--optimizer=muon", "--muon_weight_decay=-0.1"],
                       capsys)
    assert "muon_weight_decay must not be negative, got -0.1" in message
    assert not any(tmp_path.iterdir())


def test_split_qkv_with_its_own_decay_resumes_exactly(tmp_path, data_dir):
    settings = dict(optimizer="muon", muon_split_qkv=True, muon_weight_decay=0.05, max_iters=40, eval_interval=20,
                    attn_log_interval=0, final_eval=False)
    train(tiny_config(data_dir, tmp_path / "straight", **settings))
    train(tiny_config(data_dir, tmp_path / "halves", **{**settings, "max_iters": 20}))
    train(tiny_config(data_dir, tmp_path / "halves", **settings, init_from="resume"))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in CLOCKED} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "halves")) == strip(read_metrics(tmp_path / "straight"))


def test_on_a_cpu_without_bfloat16_muon_orthogonalises_in_float32(monkeypatch):
    """torch's Muon runs its Newton-Schulz iteration in bfloat16, tens of times slower than float32 on a CPU
    without bfloat16 instructions, and emulated on GPUs before Ampere: there glimpse runs the same iteration in
    float32 (no GPU here: torch's answer on a V100 or T4 is stood in for)."""
    cfg = train_config(**SHAPE)
    torch.manual_seed(0)
    model = GPT(cfg.model_config(vocab_size=20))
    optimizer = configure_optimizer(model, cfg, torch.device("cpu"))
    assert optimizer.muon.float32_ns == (not cpu_computes_bfloat16())
    for native in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: including_emulation or native)
        assert configure_optimizer(model, cfg, torch.device("cuda")).muon.float32_ns == (not native)
    # on a Mac too: bfloat16 needs macOS 14 there, and is emulated on some Apple GPUs (configure_optimizer builds
    # the optimizer without touching the device)
    assert configure_optimizer(model, cfg, torch.device("mps")).muon.float32_ns
    optimizer.muon.float32_ns = True
    g = torch.randn(48, 16)
    ours = newton_schulz_float32(g, (3.4445, -4.775, 2.0315), 5, 1e-7)
    torchs = muon_module._zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7)
    assert ours.dtype == torch.float32 and torchs.dtype == torch.bfloat16 and ours.shape == g.shape
    torch.testing.assert_close(ours, torchs.float(), rtol=0, atol=2e-2)  # the same iteration up to bfloat16's rounding
    singular = torch.linalg.svdvals(ours)
    assert 0.5 < singular.min() and singular.max() < 1.5  # orthogonal up to the iteration's deliberate spread
    # a step with float32 iterations, against torch's own Muon stepped on copies with the same gradients
    start = {name: p.detach().clone() for name, p in muon_matrices(model).items()}
    grads = [{name: torch.randn_like(p) for name, p in muon_matrices(model).items()}]
    original = muon_module._zeropower_via_newtonschulz
    take_steps(model, optimizer, cfg, grads)
    assert muon_module._zeropower_via_newtonschulz is original  # torch's module is left as it was
    copies = {name: torch.nn.Parameter(w.clone()) for name, w in start.items()}
    reference = torch.optim.Muon(list(copies.values()), lr=cfg.muon_lr / 3, momentum=cfg.muon_momentum,
                                 ns_steps=cfg.muon_ns_steps, weight_decay=cfg.muon_weight_decay)
    for name, p in copies.items():
        p.grad = grads[0][name].clone()
    reference.step()
    for name, p in muon_matrices(model).items():
        moved, expected = p.detach() - start[name], copies[name].detach() - start[name]
        assert not torch.equal(moved, expected)  # float32, not bfloat16
        torch.testing.assert_close(moved, expected, rtol=0, atol=5e-2 * expected.abs().max().item())


def test_under_float32_iterations_a_matrix_with_no_gradient_only_decays():
    """With zero_init_proj every block's c_proj starts at zero, so no gradient reaches c_attn and c_fc at the first
    step: theirs are zero. Orthogonalised in float32 (CPUs without bfloat16, older GPUs, Macs), a zero gradient must
    be a zero update, as it is in torch's bfloat16 iteration, not X / |X| = 0 / 0: the step leaves those matrices
    finite, shrunk by Muon's decay alone."""
    cfg = train_config(**SHAPE, zero_init_proj=True, muon_weight_decay=0.3)
    torch.manual_seed(0)
    model = GPT(cfg.model_config(vocab_size=20))
    before = {name: p.detach().clone() for name, p in muon_matrices(model).items()}
    optimizer = configure_optimizer(model, cfg, torch.device("cpu"))
    optimizer.muon.float32_ns = True
    idx = torch.randint(0, 20, (2, 8))
    model(idx, idx)[1].backward()
    set_lr(optimizer, cfg.learning_rate / 3, cfg)
    optimizer.step()
    shrink = 1 - cfg.muon_lr / 3 * cfg.muon_weight_decay
    for name, p in muon_matrices(model).items():
        assert torch.isfinite(p).all(), name
        if name.endswith(("c_attn.weight", "c_fc.weight")):
            torch.testing.assert_close(p.detach(), before[name] * shrink, rtol=1e-6, atol=0, msg=name)
        else:  # the projections have gradients: they move
            assert not torch.equal(p.detach(), before[name] * shrink), name


def test_adamw_takes_the_fused_kernel_on_cpu_and_cuda_and_not_on_mps():
    """One kernel for the whole update rather than a loop over the parameters, where torch has it: on CPUs and CUDA
    GPUs (MPS lacks it on older torch). The update is the same either way, so only the setting tells them apart."""
    for optimizer_name in ("adamw", "muon"):
        cfg = train_config(**{**SHAPE, "optimizer": optimizer_name})
        model = GPT(cfg.model_config(vocab_size=20))
        for device, fused in (("cpu", True), ("cuda", True), ("mps", False)):
            optimizer = configure_optimizer(model, cfg, torch.device(device))
            adamw = optimizer.adamw if optimizer_name == "muon" else optimizer
            assert [bool(group["fused"]) for group in adamw.param_groups] == [fused, fused], (optimizer_name, device)
