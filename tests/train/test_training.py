"""Training: gradient accumulation, exact resume, seeded losses and per-module learning rates
(the `recorder` fixture is in this folder's conftest.py)."""

import json
import math

import pytest
import torch

from tests.conftest import tiny_model_config
from tests.train.helpers import Interrupted, InterruptAfter, make_config, quiet, run_module
from vlmkit.config import STAGE_LEARNING_RATES, LearningRates, load_config
from vlmkit.data.dataset import Collator, ConversationDataset
from vlmkit.data.records import read_records
from vlmkit.processing.processor import IGNORE_INDEX
from vlmkit.train.trainer import module_of


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --- a. gradient accumulation -------------------------------------------------------------------


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradients_normalised_by_window_tokens_equal_one_big_batch(tiny, train_records):
    model, processor = tiny.model.train(), tiny.processor
    dataset = ConversationDataset(train_records, processor, max_length=1024)
    collate = Collator(processor.tokenizer.pad_token_id)
    counts = [int((e.labels != IGNORE_INDEX).sum()) for e in dataset.examples]
    # Micro-batches with clearly different supervised-token counts: a short (caption-like) sample
    # alone, then two, then three ordinary ones.
    short = counts.index(min(counts))
    others = [i for i in range(len(counts)) if counts[i] > min(counts)][:5]
    chunks = [[short], others[:2], others[2:]]
    micro = [collate([dataset[i] for i in chunk]) for chunk in chunks]
    full = collate([dataset[i] for chunk in chunks for i in chunk])
    per_micro = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
    total = int((full["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert len(set(per_micro)) == len(per_micro) and sum(per_micro) == total

    model.zero_grad()
    model(**full).loss.backward()  # mean over all supervised tokens of the batch
    reference = _grads(model)
    assert len(reference) > 10 and all(g.abs().sum() > 0 for g in reference.values())

    model.zero_grad()
    for batch in micro:  # what the Trainer does: each micro-loss is sum / (tokens of the whole window)
        model(**batch, num_items_in_batch=total).loss.backward()
    accumulated = _grads(model)
    assert accumulated.keys() == reference.keys()
    for name, grad in reference.items():
        assert torch.allclose(accumulated[name], grad, rtol=1e-5, atol=1e-7), name

    model.zero_grad()
    for batch in micro:  # the naive alternative: the mean of per-micro-batch means
        (model(**batch).loss / len(micro)).backward()
    naive = _grads(model)
    assert not all(torch.allclose(naive[n], g, rtol=1e-3, atol=1e-5) for n, g in reference.items())


def test_trainer_batch_4_equals_batch_2_with_2_accumulation_steps(synth_dir, tmp_path, recorder):
    # In float64: in float32, summation order alone moved some weights by 1e-5 after three
    # Adam steps (Adam magnifies noise in near-zero gradients), too close to a real error.
    for name, batch, accum in (("b4", 4, 1), ("b2x2", 2, 2)):
        cfg = make_config(synth_dir, tmp_path / name, batch_size=batch, grad_accum=accum, max_steps=3)
        cfg.model.dtype = "float64"
        run_module.run(cfg, log=quiet)
    big, small = recorder.trainers
    assert big.model.dtype == small.model.dtype == torch.float64

    # The sampler gives the same order either way: each accumulation window holds the big batch's samples.
    assert len(big.samples) == 3 and len(small.samples) == 6
    for step in range(3):
        assert sorted(big.samples[step]) == sorted(small.samples[2 * step] + small.samples[2 * step + 1])
    # Both micro-batches of a window are normalised by the window's supervised-token count ...
    for step in range(3):
        window = small.supervised[2 * step] + small.supervised[2 * step + 1]
        assert small.num_items[2 * step] == small.num_items[2 * step + 1] == window == big.num_items[step]
    # ... which matters, because the micro-batches' own counts differ.
    assert any(small.supervised[2 * s] != small.supervised[2 * s + 1] for s in range(3))
    # The summed micro-losses of a window are the big batch's loss.
    for step in range(3):
        # (the LM computes its loss in float32, hence the float32 tolerance)
        assert small.losses[2 * step] + small.losses[2 * step + 1] == pytest.approx(big.losses[step], rel=1e-5)

    final_big, final_small = big.model.state_dict(), small.model.state_dict()
    assert _max_diff(final_big, big.initial_state) > 1e-3  # training moved the weights ...
    assert _max_diff(final_big, final_small) < 1e-9  # ... identically in both runs


# --- b. resume ------------------------------------------------------------------------------------


def test_resuming_from_a_checkpoint_ends_with_the_same_weights(synth_dir, tmp_path, recorder):
    settings = {"max_steps": 6, "save_steps": 3, "batch_size": 2}
    run_module.run(make_config(synth_dir, tmp_path / "A", **settings), log=quiet)
    uninterrupted = recorder.trainers[-1]
    assert (tmp_path / "A" / "checkpoint-3").is_dir() and (tmp_path / "A" / "checkpoint-6").is_dir()

    recorder.callbacks = [InterruptAfter(3)]
    with pytest.raises(Interrupted):
        run_module.run(make_config(synth_dir, tmp_path / "B", **settings), log=quiet)
    assert (tmp_path / "B" / "checkpoint-3").is_dir()
    assert not (tmp_path / "B" / "checkpoint-6").exists()
    assert recorder.trainers[-1].state.global_step == 3

    recorder.callbacks = []
    messages = []
    run_module.run(make_config(synth_dir, tmp_path / "B", resume=True, **settings), log=messages.append)
    resumed = recorder.trainers[-1]
    assert not any("no checkpoint" in m for m in messages)
    assert resumed.state.global_step == 6
    # Only the last three steps ran again, on the same batches as the uninterrupted run, with the same losses.
    assert resumed.samples == uninterrupted.samples[3:]
    assert resumed.losses == pytest.approx(uninterrupted.losses[3:], rel=1e-6, abs=1e-7)

    final_a, final_b = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert _max_diff(final_a, uninterrupted.initial_state) > 1e-3
    for name, weight in final_a.items():
        assert torch.allclose(final_b[name], weight, rtol=0, atol=1e-6), name


# --- c. seeded losses ------------------------------------------------------------------------------


def test_first_losses_are_deterministic_and_start_at_log_vocab_size(synth_dir, tmp_path, recorder):
    for name, seed in (("first", 0), ("again", 0), ("other_seed", 1)):
        run_module.run(make_config(synth_dir, tmp_path / name, max_steps=3, seed=seed), log=quiet)
    first, again, other = recorder.trainers
    assert len(first.losses) == 3
    assert first.losses == again.losses  # bit for bit
    assert first.losses != other.losses  # the seed does decide them (model init and data order)
    logged = [entry["loss"] for entry in first.state.log_history if "loss" in entry]
    assert logged == pytest.approx(first.losses, rel=1e-4)

    # Random init (std 0.02, tied embeddings): the logits are near zero, so the first loss is the
    # cross-entropy of a uniform guess over the vocabulary.
    vocab = first.model.config.text_config.vocab_size
    assert vocab == len(first.processing_class.tokenizer)
    for trainer in (first, other):
        assert abs(trainer.losses[0] - math.log(vocab)) < 0.5, (trainer.losses[0], math.log(vocab))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path; on a GPU bf16 needs no help")
def test_bf16_trains_on_a_cpu_only_machine_under_autocast(synth_dir, tmp_path, recorder):
    # The Trainer refuses bf16 with no GPU unless told `use_cpu`; then it runs the forward pass
    # under CPU autocast, so the first losses differ from float32 only by bf16 rounding.
    for name, bf16 in (("fp32", False), ("bf16", True)):
        run_module.run(make_config(synth_dir, tmp_path / name, max_steps=2, bf16=bf16), log=quiet)
    fp32, bf16 = recorder.trainers
    assert bf16.args.bf16 and bf16.args.use_cpu
    assert bf16.losses != fp32.losses  # autocast was really on
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2)


# --- d. which modules train --------------------------------------------------------------------------


def test_stage_defaults_and_scratch_rates():
    align = load_config(None, ["train.stage=align"]).train
    # Pretrained parts: the stage's defaults (align trains the projector only).
    assert align.learning_rates(frozenset()) == STAGE_LEARNING_RATES["align"] == LearningRates(0.0, 1e-3, 0.0)
    # Parts built from configs start random, so they train at scratch_lr whatever the stage says ...
    everything = frozenset({"vision", "projector", "lm"})
    assert align.learning_rates(everything) == LearningRates(align.scratch_lr, align.scratch_lr, align.scratch_lr)
    assert align.learning_rates(frozenset({"projector"})) == LearningRates(0.0, align.scratch_lr, 0.0)
    # ... unless a rate is given explicitly, 0 included.
    explicit = load_config(None, ["train.stage=align", "train.lr.vision=0", "train.lr.lm=5.0e-4"]).train
    assert explicit.learning_rates(everything) == LearningRates(0.0, explicit.scratch_lr, 5e-4)


def test_a_learning_rate_override_in_plain_exponent_form_is_a_float():
    # `vlmkit train --help` gives exactly this example: --set train.lr.lm=1e-4
    assert load_config(None, ["train.lr.lm=1e-4", "train.scratch_lr=3e-3"]).train.lr.lm == 1e-4


# A batch-norm tower (RegNet) would update its running statistics in training mode: frozen must mean unchanged.
REGNET = {"model_type": "regnet", "embedding_size": 8, "hidden_sizes": [16, 32], "depths": [1, 1], "groups_width": 8,
          "layer_type": "y"}


@pytest.mark.parametrize("tower", ["clip", "regnet"])
def test_align_stage_with_frozen_vision_trains_only_projector_and_lm(synth_dir, tmp_path, recorder, tower):
    cfg = make_config(synth_dir, tmp_path / "align", stage="align", max_steps=2)
    cfg.train.lr.vision = 0.0
    if tower == "regnet":
        cfg.model = tiny_model_config(vision_config=dict(REGNET), image_size=32)
    messages = []
    run_module.run(cfg, log=messages.append)
    (trainer,) = recorder.trainers
    model, before = trainer.model, trainer.initial_state
    assert any("'vision': 0.0" in m and "trainable parameters {'vision': 0," in m for m in messages)

    # The optimizer holds no vision parameter; projector and LM train at scratch_lr (random weights).
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {name.removesuffix("_no_decay") for name in groups} == {"projector", "lm"}
    assert all(g["initial_lr"] == cfg.train.scratch_lr for g in groups.values())
    optimised = {id(p) for g in groups.values() for p in g["params"]}
    names = dict(model.named_parameters())
    assert not any(id(p) in optimised for n, p in names.items() if module_of(n) == "vision")

    after = model.state_dict()
    changed = {key: not torch.equal(after[key], before[key]) for key in after}
    vision = [k for k in after if module_of(k) == "vision"]
    projector = [k for k in after if module_of(k) == "projector"]
    lm = [k for k in after if module_of(k) == "lm"]
    assert vision and projector and lm
    assert not any(changed[k] for k in vision)
    assert not any(p.requires_grad for n, p in names.items() if module_of(n) == "vision")
    assert all(changed[k] for k in projector)
    assert any(changed[k] for k in lm)


def test_tokenizer_data_gives_a_later_stages_words_and_the_roles_their_own_tokens(synth_dir, tmp_path):
    """A first stage trains the tokenizer on `data.tokenizer_data` too (the demo's align stage
    names the SFT questions), without training on those records."""
    from vlmkit.config import RunConfig
    from vlmkit.train.run import prepare_model

    later = tmp_path / "later.jsonl"
    record = {"images": [], "conversations": [{"role": "user", "content": "zanzibarquux?"},
                                              {"role": "assistant", "content": "zanzibarquux"}]}
    later.write_text("".join(json.dumps({"id": f"q{i}", **record}) + "\n" for i in range(200)))
    records = read_records(synth_dir / "captions.jsonl")[0]

    def tokenizer(tokenizer_data):
        cfg = RunConfig()
        cfg.model, cfg.data.tokenizer_data = tiny_model_config(), tokenizer_data
        return prepare_model(cfg, records, None, log=quiet)[1].tokenizer

    alone, with_later = tokenizer(None), tokenizer(str(later))
    assert len(alone.tokenize("zanzibarquux")) > 1
    assert with_later.tokenize("zanzibarquux") == ["zanzibarquux"]
    assert alone.tokenize("assistant") == ["assistant"], "the chat roles are in every turn"
