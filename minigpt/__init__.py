"""minigpt: a from-scratch, pure-PyTorch GPT-2.

Every public name is imported here, eagerly: `from minigpt import generate` is the function,
whatever was imported before. The commands live in `minigpt.cli` (`python -m minigpt.train`
runs `minigpt.cli.train.main`).
"""

from .backends import (QuantizedLinear, QuantizedTrainingError, cpu_has_bf16_arithmetic, keep_freed_memory,
                       optimize_for_cpu, quantize_weights)
from .book import (calc_loss_batch, calc_loss_loader, evaluate_model, generate_and_print_sample,
                   generate_greedy_text, generate_next_greedy_token, generate_text_simple, print_sampled_tokens,
                   softmax_with_temperature, train_model_simple)
from .checkpoint import load_model, save_model
from .classifier import GPTClassifier
from .config import PRESETS, GPTConfig, get_preset
from .data import (NAMED_CORPORA, DocumentChunkDataset, GPTDatasetV1, TokenCorpus, TokenDocuments, TokenWindowDataset,
                   chunk_documents, create_dataloader_v1, document_starts, iter_documents, load_token_ids,
                   load_tokens, pack_documents, resolve_corpus, split_corpus, split_documents, split_tokens,
                   window_dataset)
from .device import resolve_device
from .errors import (CheckpointError, ConfigError, DataError, DirectoryInUse, DownloadError, MinigptError,
                     MissingExtra, NonFiniteLoss, StorageError)
from .evaluation import (HellaSwagExample, PerplexityResult, evaluate_perplexity, hellaswag_accuracy, read_hellaswag,
                         score_hellaswag, sliding_windows)
from .finetune import (CheckpointedBlock, LowPrecisionLinear, checkpoint_blocks, freeze, peak_memory_mb,
                       store_frozen_in, trainable_parameters)
from .generation import SamplingConfig, generate, generate_tokens, stream
from .head_tasks import HiddenStatesTask, QuestionAnsweringTask, TokenClassificationTask
from .heads import GPTBaseModel, GPTForQuestionAnswering, GPTForTokenClassification, best_spans, build_head, span_loss
from .inspection import attention_maps, hidden_states, nearest_neighbors
from .lora import LoRAConfig, LoRALinear, apply_lora, has_lora, merge_lora, weights_fingerprint
from .loss import linear_cross_entropy, perplexity
from .model import GELU, FeedForward, GPTModel, KVCache, LayerNorm, MultiHeadAttention, TransformerBlock, crop_context
from .plot import plot_attention, plot_attention_grid, plot_losses
from .serving import chat_prompt, create_app
from .tokenizer import EOS_ID, get_tokenizer, text_to_token_ids, token_ids_to_text
from .training import LanguageModelTask, Trainer, TrainConfig
from .weights import assign, download_and_load_gpt2, from_pretrained, load_classifier, load_weights_into_gpt, save_hf

__all__ = [
    # the model
    "GPTConfig", "PRESETS", "get_preset", "LayerNorm", "GELU", "FeedForward", "MultiHeadAttention",
    "TransformerBlock", "GPTModel", "KVCache", "crop_context", "resolve_device",
    # the CPU backend
    "optimize_for_cpu", "cpu_has_bf16_arithmetic", "keep_freed_memory", "quantize_weights", "QuantizedLinear",
    "QuantizedTrainingError",
    # text
    "get_tokenizer", "text_to_token_ids", "token_ids_to_text", "EOS_ID",
    # data
    "NAMED_CORPORA", "resolve_corpus", "iter_documents", "load_token_ids", "split_tokens",
    "TokenWindowDataset", "GPTDatasetV1", "create_dataloader_v1", "pack_documents", "chunk_documents",
    "split_documents", "DocumentChunkDataset", "load_tokens", "TokenCorpus", "TokenDocuments", "split_corpus",
    "window_dataset", "document_starts",
    # the book's procedures
    "train_model_simple", "evaluate_model", "generate_and_print_sample", "calc_loss_batch", "calc_loss_loader",
    "generate_text_simple", "softmax_with_temperature", "print_sampled_tokens", "generate_next_greedy_token",
    "generate_greedy_text",
    # losses, training
    "perplexity", "linear_cross_entropy", "plot_losses", "Trainer", "TrainConfig", "LanguageModelTask",
    # generation
    "generate", "generate_tokens", "stream", "SamplingConfig",
    # weights and checkpoints
    "save_model", "load_model", "load_classifier", "from_pretrained", "download_and_load_gpt2",
    "load_weights_into_gpt", "assign", "save_hf",
    # evaluation
    "evaluate_perplexity", "PerplexityResult", "sliding_windows", "score_hellaswag", "read_hellaswag",
    "hellaswag_accuracy", "HellaSwagExample",
    # serving
    "create_app", "chat_prompt",
    # fine-tuning: LoRA, frozen layers, memory
    "LoRALinear", "LoRAConfig", "apply_lora", "merge_lora", "has_lora", "weights_fingerprint", "freeze",
    "trainable_parameters", "store_frozen_in", "LowPrecisionLinear", "checkpoint_blocks", "CheckpointedBlock",
    "peak_memory_mb",
    # heads: hidden states, token classification, question answering
    "GPTBaseModel", "GPTForTokenClassification", "GPTForQuestionAnswering", "best_spans", "build_head", "span_loss",
    "TokenClassificationTask", "QuestionAnsweringTask", "HiddenStatesTask",
    # classification, inspection
    "GPTClassifier", "nearest_neighbors", "hidden_states", "attention_maps", "plot_attention",
    "plot_attention_grid",
    # errors
    "MinigptError", "ConfigError", "DataError", "CheckpointError", "DownloadError", "NonFiniteLoss",
    "MissingExtra", "StorageError", "DirectoryInUse",
]
