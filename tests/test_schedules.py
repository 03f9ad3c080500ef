"""Learning-rate schedules (--lr-schedule, --warmup-ratio, --min-lr), AdamW's betas and embedding
decay, against their closed forms; old checkpoints' unnamed schedules keep their numbers."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt import GPTModel
from minigpt.cli.train import build_parser, check_args, upgrade_train_args
from minigpt.errors import ConfigError
from minigpt.training import TrainConfig, configure_optimizer, lr_at
from minigpt.training.optim import schedule_of, warmup_steps_of

TOTAL = 20


def cosine(step: int, lr: float, floor: float, warmup: int, total: int = TOTAL) -> float:
    return floor + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * (lr - floor)


def hf_linear(step: int, lr: float, warmup: int, total: int = TOTAL) -> float:
    """transformers' get_linear_schedule_with_warmup after its warm-up."""
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def test_unnamed_schedules_are_the_chapter5_ones():
    """No --lr-schedule: constant without --min-lr (the chapter-5 run), cosine to --min-lr with it."""
    assert [lr_at(s, TrainConfig(lr=0.3), TOTAL) for s in range(TOTAL)] == [0.3] * TOTAL
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert schedule_of(cfg) == ("cosine", 0.1)
    for s in range(4, TOTAL + 3):
        assert lr_at(s, cfg, TOTAL) == pytest.approx(cosine(min(s, TOTAL), 1.0, 0.1, 4), abs=1e-15)


@pytest.mark.parametrize("kind,min_lr,floor", [("cosine", None, 0.1), ("cosine", 0.0, 0.0), ("cosine", 0.25, 0.25),
                                               ("linear", None, 0.0), ("linear", 0.2, 0.2)])
def test_named_schedules_decay_to_their_floor(kind, min_lr, floor):
    cfg = TrainConfig(lr=1.0, lr_schedule=kind, min_lr=min_lr, warmup_steps=5)
    assert [lr_at(s, cfg, TOTAL) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    for s in range(5, TOTAL + 1):
        expected = cosine(s, 1.0, floor, 5) if kind == "cosine" else floor + (1 - floor) * hf_linear(s, 1.0, 5)
        assert lr_at(s, cfg, TOTAL) == pytest.approx(expected, abs=1e-12), s
    assert lr_at(TOTAL, cfg, TOTAL) == pytest.approx(floor) and lr_at(5, cfg, TOTAL) == 1.0


def test_linear_is_hugging_faces_after_the_warm_up():
    cfg = TrainConfig(lr=5e-5, lr_schedule="linear")
    assert [lr_at(s, cfg, 8) for s in range(8)] == pytest.approx([hf_linear(s, 5e-5, 0, 8) for s in range(8)])


def test_constant_keeps_the_rate_after_the_warm_up():
    cfg = TrainConfig(lr=2.0, lr_schedule="constant", warmup_steps=2)
    assert [lr_at(s, cfg, 6) for s in range(6)] == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_warmup_ratio_rounds_up_as_hugging_face_does():
    cfg = TrainConfig(lr=1.0, lr_schedule="cosine", warmup_ratio=0.05)
    assert warmup_steps_of(cfg, 101) == 6 and warmup_steps_of(cfg, 100) == 5
    assert lr_at(0, cfg, 100) == pytest.approx(0.2) and lr_at(4, cfg, 100) == 1.0


@pytest.mark.parametrize("flags,message", [
    (["--lr-schedule", "constant", "--min-lr", "1e-5"], "--min-lr 1e-05 has no effect with --lr-schedule constant"),
    (["--warmup-steps", "3", "--warmup-ratio", "0.1"], "not both"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)"),
    (["--adam-betas", "0.9", "1.0"], "--adam-betas must be two numbers in [0, 1)"),
    (["--log-interval", "0"], "--log-interval must be positive"),
])
def test_schedule_flags_no_run_can_use_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_args(build_parser().parse_args(flags))


def test_flags_parse_to_the_config():
    args = build_parser().parse_args(["--lr-schedule", "linear", "--adam-betas", "0.9", "0.95", "--eval-iters",
                                      "all", "--log-interval", "10", "--warmup-ratio", "0.05"])
    cfg = TrainConfig.from_flags(vars(args))
    assert (cfg.lr_schedule, list(cfg.adam_betas), cfg.eval_iters, cfg.log_interval, cfg.warmup_ratio) == \
        ("linear", [0.9, 0.95], None, 10, 0.05)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--eval-iters", "some"])


def test_betas_and_embedding_decay_reach_the_optimizer(tiny_cfg):
    model = GPTModel(tiny_cfg)
    opt = configure_optimizer(model, 1e-3, 0.1, torch.device("cpu"), betas=(0.9, 0.95))
    assert opt.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    for decay_embeddings in (False, True):
        decay, _ = configure_optimizer(model, 1e-3, 0.1, torch.device("cpu"), decay_embeddings=decay_embeddings
                                       ).param_groups
        decayed = {names[id(p)] for p in decay["params"]}
        assert ({"tok_emb.weight", "pos_emb.weight"} <= decayed) == decay_embeddings
        assert not any(n.endswith((".bias", ".scale", ".shift")) for n in decayed)


def test_old_checkpoints_name_the_schedule_they_ran():
    assert upgrade_train_args({"min_lr": None, "lr": 5e-4})["lr_schedule"] == "constant"
    assert upgrade_train_args({"min_lr": 1e-4, "lr": 5e-4})["lr_schedule"] == "cosine"
    assert upgrade_train_args({"min_lr": 1e-4, "lr_schedule": "linear"})["lr_schedule"] == "linear"
    old = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2)
    upgraded = TrainConfig(**{**vars(old), "lr_schedule": upgrade_train_args(vars(old))["lr_schedule"]})
    assert [lr_at(s, old, 10) for s in range(12)] == [lr_at(s, upgraded, 10) for s in range(12)]
