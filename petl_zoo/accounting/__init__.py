"""Accounting and benchmarks for every registered method: parameters, stored bytes, FLOPs, speed, memory.

    from petl_zoo import accounting
    rows = accounting.run_benchmark("vit_tiny_patch16_224", ["lora", "neat"], batch=8,
                                    num_classes=10, model_kwargs=dict(img_size=32, patch_size=4))
    print(accounting.format_table(rows, accounting.compute_checks(rows)))

Modules, one concern each:

- :mod:`.flops`: inference GMACs per image, fvcore (:func:`count_gmacs`, with an SDPA handle) and
  torch's ``FlopCounterMode`` (:func:`count_gmacs_torch`, with the CPU SDPA kernel's formula);
- :mod:`.params`: trainable parameter counts and the bytes of the stored adapter file;
- :mod:`.timing`: one training step and one inference call as timed callables;
- :mod:`.memory`: training memory split into weights, gradients, optimizer state and activations with
  the step's peak (CUDA allocator, or the profiler's allocation events on CPU), and the older single
  peak (CUDA allocator, or peak RSS of a fresh child process on CPU);
- :mod:`.variants`: the backbone factory (:func:`petl_zoo.train.backbone.build_backbone`), the method
  list and each patched variant, including the ``base``, ``lora_qkv`` and ``peft_lora`` rows;
- :mod:`.runner`: :func:`run_benchmark` and its :class:`BenchRow`;
- :mod:`.report`: ratio checks with their spread over rounds, markdown table and a chart;
- :mod:`.outputs`: the ``--out`` folder checked up front, rows appended as measured, JSON/CSV files;
- :mod:`.cli`: the command line, ``python -m petl_zoo.accounting`` (see docs/benchmark.md).
"""

from .flops import count_gmacs, count_gmacs_torch, example_input, sdpa_flop_jit
from .memory import MemoryBreakdown, measure_memory, memory_breakdown
from .outputs import OutputError, ProgressLog, prepare_out, write_outputs
from .params import param_counts, stored_bytes
from .report import COLUMNS, check_summary, compute_checks, format_table, plot_results
from .runner import BenchRow, run_benchmark
from .variants import (
    BASE,
    LORA_QKV,
    PEFT_LORA,
    build_variant,
    default_methods,
    model_factory,
    parse_method_options,
)

__all__ = [
    "BASE",
    "COLUMNS",
    "LORA_QKV",
    "PEFT_LORA",
    "BenchRow",
    "MemoryBreakdown",
    "OutputError",
    "ProgressLog",
    "build_variant",
    "check_summary",
    "compute_checks",
    "count_gmacs",
    "count_gmacs_torch",
    "default_methods",
    "example_input",
    "format_table",
    "measure_memory",
    "memory_breakdown",
    "model_factory",
    "param_counts",
    "parse_method_options",
    "plot_results",
    "prepare_out",
    "run_benchmark",
    "sdpa_flop_jit",
    "stored_bytes",
    "write_outputs",
]
