"""The chunked loss computes transformers' causal-LM loss and its gradients, without full logits."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from llava_cluster.train.chunked_loss import chunked_causal_lm_loss, head_weight

VOCAB, HIDDEN = 97, 16


def case(seed: int, batch: int = 3, length: int = 40, supervised: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, HIDDEN, generator=gen, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float32)
    labels = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) > supervised] = -100
    return hidden, weight, labels


def reference(hidden, weight, labels, num_items=None):
    return ForCausalLMLoss(hidden @ weight.T, labels, VOCAB, num_items_in_batch=num_items)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("num_items", [None, 17])
def test_value_and_hidden_gradient_equal_the_transformers_loss(chunk, num_items):
    hidden, weight, labels = case(seed=chunk)
    want = reference(hidden, weight, labels, num_items)
    (want_grad,) = torch.autograd.grad(want, hidden)
    got = chunked_causal_lm_loss(hidden, weight, labels, num_items, chunk=chunk)
    (got_grad,) = torch.autograd.grad(got, hidden)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    assert got_grad.abs().sum() > 0


def test_a_batch_with_nothing_supervised_gives_zero_loss_and_zero_gradient():
    hidden, weight, labels = case(seed=3)
    labels[:] = -100
    loss = chunked_causal_lm_loss(hidden, weight, labels)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert float(loss) == 0.0 and float(grad.abs().sum()) == 0.0


def test_a_trainable_head_is_refused():
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    with pytest.raises(ValueError, match="frozen"), head_weight(head):
        pass


def test_lora_and_projector_gradients_equal_on_the_tiny_llava(tiny_dir):
    """Through the real model: hidden states of the inner LlavaModel + the frozen lm_head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_cluster.data.collator import LlavaCollator
    from llava_cluster.data.dataset import LazySupervisedDataset
    from llava_cluster.data.templates import get_template
    from llava_cluster.spec import DEFAULT_LORA_TARGETS

    processor = AutoProcessor.from_pretrained(tiny_dir.model)
    data = LazySupervisedDataset(str(tiny_dir.train), str(tiny_dir.images), processor, get_template("vicuna_v1"), 256)
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([data[i] for i in range(4)])
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS,
                                             init_lora_weights=False))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or "multi_modal_projector" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]

    want = model(**batch).loss
    want_grads = torch.autograd.grad(want, trainable)
    llava = model.base_model.model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = llava.model(**inputs).last_hidden_state
    with head_weight(llava.lm_head) as weight:
        got = chunked_causal_lm_loss(hidden, weight, batch["labels"], chunk=5)
    got_grads = torch.autograd.grad(got, trainable)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert float((g - w).abs().max()) <= 1e-5 * float(w.abs().max()) + 1e-9, float((g - w).abs().max())


def test_the_trainer_switch_takes_the_chunked_path_and_gives_the_same_loss(tiny_dir, tmp_path):
    """LlavaTrainer.compute_loss with chunked_loss never runs lm_head over the batch, and agrees."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainingArguments

    from llava_cluster.data.collator import LlavaCollator
    from llava_cluster.data.dataset import LazySupervisedDataset
    from llava_cluster.data.templates import get_template
    from llava_cluster.spec import DEFAULT_LORA_TARGETS
    from llava_cluster.train.trainer import LlavaTrainer

    processor = AutoProcessor.from_pretrained(tiny_dir.model)
    data = LazySupervisedDataset(str(tiny_dir.train), str(tiny_dir.images), processor, get_template("vicuna_v1"), 256)
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([data[i] for i in range(3)])
    model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(tiny_dir.model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS, init_lora_weights=False))
    calls = []
    model.base_model.model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=3)
    losses = {}
    for flag in (False, True):
        trainer = LlavaTrainer(model=model, args=args, projector_lr=1e-4, offload_optimizer=False, metadata={},
                               chunked_loss=flag)
        calls.clear()
        losses[flag] = float(trainer.compute_loss(model, dict(batch), num_items_in_batch=None).detach())
        assert len(calls) == (0 if flag else 1)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
