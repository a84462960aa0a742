"""GPT-OSS on ossrl's kernels: configuration, model, checkpoint loading, tokenizers, chat format.

    model = ossrl.model.load_pretrained("path/to/gpt-oss-20b", device="cuda")
    logits = model(input_ids, cu_seqlens)          # packed (T,) ids, (B+1,) int32 -> (T, vocab)

    model = ossrl.model.GptOss(ossrl.model.GptOssConfig.tiny())   # the CPU default, random weights
"""

from .config import ConfigError, GptOssConfig, RopeConfig
from .gpt_oss import GptOss, KVCache
from .harmony import (Message, developer_message, encode_conversation, parse_completion, render_text,
                      system_message, tool_call, tool_result)
from .loading import CheckpointError, dequantize_mxfp4, load_pretrained, save_pretrained
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "GptOssConfig", "RopeConfig", "ConfigError", "GptOss", "KVCache",
    "load_pretrained", "save_pretrained", "CheckpointError", "dequantize_mxfp4",
    "Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer",
    "Message", "system_message", "developer_message", "tool_call", "tool_result", "render_text",
    "encode_conversation", "parse_completion",
]
