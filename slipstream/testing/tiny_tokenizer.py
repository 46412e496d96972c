"""A small byte-level BPE tokenizer trained at call time, for tests without the HF hub."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# SmolLM2's special tokens, at SmolLM2's ids (0, 1, 2), so prompts built for the real model
# and for the tiny one look alike.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# A plain ChatML template (our own): each message is wrapped in <|im_start|>role ... <|im_end|>,
# and the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# 256 byte tokens plus the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

_CORPUS = """\
The river ran slowly past the old mill, and the children sat on the bank to watch the boats.
Every morning the baker opened his shop at six o'clock and sold warm bread to the workers.
A small cat followed the postman along the street, hoping that someone would feed it.
When the rain stopped, the whole town came outside to look at the bright rainbow.
She wrote a long letter to her brother, who lived far away in a city by the sea.
The teacher asked the students to read the first chapter and answer three questions.
In the evening the lights of the harbour shone on the water like scattered stars.
Computers store numbers as bits, and a program tells the machine what to do with them.
Our server answers requests quickly: it batches many prompts and generates tokens together.
The model predicts the next word, one token at a time, until it reaches a stop string.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Please summarise the following text in two sentences, and keep the important details.
Water boils at 100 degrees, and the train leaves at 7:45 from platform 3, not 12.
Prices rose by 2.5% in 2023; the report lists 1,024 items and 64 categories.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Questions, answers, lists (one, two, three) and quotes "like this" are all welcome here.
def add(a, b): return a + b  # a tiny function [with brackets] {and braces} <and tags>
x = [1, 2, 3]; y = {"key": "value"}; print(x[0] * 2 - 1 / 4)
Gardeners plant tomatoes in spring, water them through summer and harvest them in autumn.
Mountains covered with snow rise above green valleys where farmers keep sheep and horses.
The library holds thousands of books about history, science, music, painting and travel.
Engineers measured the bridge carefully before they allowed heavy trucks to cross it.
Scientists believe that understanding language requires knowledge, memory and reasoning.
Yesterday afternoon my grandmother baked chocolate biscuits for everybody in the family.
Musicians practised together in the basement, playing guitars, drums and a piano.
Travellers waiting at the airport checked their tickets, passports and luggage twice.
Doctors recommend walking outdoors, sleeping enough and drinking plenty of fresh water.
Although winter was freezing, the neighbours organised a cheerful celebration downtown.
Café au lait, naïve résumé, déjà vu: a few words with accents.
日本語のテキストと中文的文本, and a smile 😀 or a heart ❤ now and then.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 40 50 64 100 128 256 512 1000
! ? . , ; : - _ ( ) [ ] { } < > / \\ | @ # $ % ^ & * + = ~ ` ' "
"""


def _train(vocab_size: int) -> str:
    """Train the byte-level BPE; return the tokenizer as JSON (cheap to rebuild from)."""
    tok = Tokenizer(models.BPE())
    # NOTE: add_prefix_space=False like SmolLM2/GPT-2, so "Hello" at the start of a text and
    # " Hello" after a space are different tokens, as in the real model.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(
            f"the built-in corpus yields {got} tokens, not the requested {vocab_size}; "
            f"choose a vocab_size between {MIN_VOCAB_SIZE} and {got}"
        )
    return str(tok.to_str())


@functools.lru_cache(maxsize=8)
def _trained_json(vocab_size: int) -> str:
    """Training takes tens of milliseconds; many tests build the same tokenizer."""
    return _train(vocab_size)


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE with SmolLM2-style special tokens and a ChatML template.

    Every call returns a fresh object (tests may mutate it); only the training is cached.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    backend = Tokenizer.from_str(_trained_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=IM_END,
        unk_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer
