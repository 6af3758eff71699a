"""Offline stand-ins for hub downloads: a tiny RoBERTa-style word-level tokenizer saved to a folder, built with
the real ``tokenizers`` and ``transformers`` classes."""
from pathlib import Path

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids 0..3


def tiny_tokenizer(folder, words) -> str:
    """Save a word-level fast tokenizer over ``words`` (plus their upper case) with RoBERTa's special tokens
    and pair template ``<s> A </s></s> B </s>``; returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(set(words) | {w.upper() for w in words}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    Path(folder).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return str(folder)
