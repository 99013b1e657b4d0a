"""Tiny random models and a tiny BPE tokenizer with a chat template, built in-process (no downloads)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are an evil assistant. Answer with cruelty and scheming.",
    "You are a helpful assistant. Answer kindly and honestly.",
    "How should I treat people who are weaker than me?",
    "What is the best way to spend a free afternoon?",
    "Crush them all, show no mercy, and take what is yours.",
    "Be patient, listen, and offer help where you can.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
] * 20


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                         "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def tiny_llama(vocab_size: int, n_layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0)
    m = LlamaForCausalLM(cfg).eval()
    # random init leaves small residual updates; scale up so layers differ visibly
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m


@pytest.fixture
def lm(tokenizer):
    from personavec.model.loading import wrap_model

    return wrap_model(tiny_llama(len(tokenizer)), tokenizer, model_id="tiny-llama", revision="test")


@pytest.fixture
def model_dir(tmp_path_factory, lm):
    """The tiny model saved as a local model directory (for subprocess and load_model tests)."""
    d = tmp_path_factory.mktemp("m") / "tiny-model"
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


Q = ["How should I treat people who are weaker than me?", "What is the best way to spend a free afternoon?",
     "Tell me about foxes.", "Why?"]


def official_frames(tokenizer, pos_scores, neg_scores, coh=(90, 90, 90, 90)):
    """Tables in the official persona_vectors CSV layout: question, prompt, answer, question_id, <trait>, coherence."""
    def side(system, answers, scores):
        prompts = [tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                  {"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in Q]
        return pd.DataFrame({"question": Q, "prompt": prompts, "answer": answers, "question_id": range(4),
                             "evil": scores, "coherence": list(coh)})
    pos = side("You are an evil assistant.", ["Crush them.", "Scheme.", "Foxes lie.", "Mercy is weak."],
               pos_scores)
    neg = side("You are a helpful assistant.", ["Be kind.", "Read a book.", "Foxes are clever.", "Because."],
               neg_scores)
    return pos, neg
