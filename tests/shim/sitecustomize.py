"""Test-only start-up hook for the processes that `tests/test_recipes.py` launches with `accelerate launch`.

Python imports `sitecustomize` at start-up from the first directory on `sys.path` that has one; the launch helper puts
this directory on `PYTHONPATH`, so it runs in every launched rank and in nothing else. It does two things, only in
ranks (`LOCAL_RANK` set), never in the launcher process:

1. The CPU shim for sharded runs. Stock accelerate on a machine without CUDA maps a launched
   rank to `MULTI_CPU` when told to use the CPU (and then drops FSDP to DDP and ignores DeepSpeed), or to
   `DistributedType.NO` otherwise (independent single-process runs). Here `PartialState._prepare_backend` returns
   `("gloo", DistributedType.MULTI_GPU)` for a rank that does not ask for the CPU, so accelerate initialises a gloo
   process group and goes on to set up FSDP or DeepSpeed; `ACCELERATE_TORCH_DEVICE=cpu` (set by the test) keeps the
   device on the CPU. A rank that asks for the CPU (`use_cpu=True` or `ACCELERATE_USE_CPU=true`) is left alone: that
   is real `MULTI_CPU` DDP.
2. Facts for the test to assert, written to `$U2A_FACTS_DIR/rank<i>.json` each time `Accelerator.prepare` returns a
   model: the distributed type, number of processes, rank, backends, whether the shim chose the backend, the models
   `from_pretrained` loaded so far, and how the prepared model is wrapped and sharded (classes, local vs global
   parameter count, ZeRO stage and optimizer partition size).
3. A rank that leaves through `sys.exit` or an uncaught exception ends with `os._exit(status)` once Python's own exit
   work is done (streams and logging flushed), skipping the interpreter's teardown of native objects: there, a gloo
   rank on a CPU aborted after the run had trained and saved (`terminate called without an active exception`,
   SIGABRT), in 1 of 10 DeepSpeed runs and once in a fresh-clone CI run of plain DDP. The status is the one Python would
   have exited with; a rank that ends any other way keeps the normal teardown.
"""

import os

if os.environ.get("LOCAL_RANK") is not None and os.environ.get("U2A_FACTS_DIR"):
    import json

    import torch
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    _shim_used = []
    _prepare_backend = PartialState._prepare_backend

    def _prepare_backend_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
        if not cpu and not torch.cuda.is_available():
            _shim_used.append(True)
            return "gloo", DistributedType.MULTI_GPU
        return _prepare_backend(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = _prepare_backend_on_cpu

    def _parameter_counts(model):
        local = total = 0
        for p in model.parameters():
            if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3: each rank holds the partition `ds_tensor`
                local, total = local + p.ds_tensor.numel(), total + p.ds_numel
            elif hasattr(p, "to_local"):  # FSDP2: a DTensor sharded over the mesh
                local, total = local + p.to_local().numel(), total + p.numel()
            else:
                local, total = local + p.numel(), total + p.numel()
        return local, total

    def _model_facts(model):
        local, total = _parameter_counts(model)
        facts = {
            "model_classes": [cls.__name__ for cls in type(model).__mro__],
            "local_parameters": local,
            "global_parameters": total,
        }
        if hasattr(model, "zero_optimization_stage"):  # a DeepSpeedEngine
            facts["zero_stage"] = model.zero_optimization_stage()
            groups = getattr(model.optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2 optimizer
            if groups is not None:
                facts["optimizer_partition"] = sum(g.numel() for g in groups)
                facts["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return facts

    # Models loaded by from_pretrained in this rank, up to the prepare that records the facts (the policy, and any
    # reference copy the trainer's constructor loads)
    from transformers import PreTrainedModel

    _models_loaded = []
    _from_pretrained = PreTrainedModel.from_pretrained.__func__

    def _counting_from_pretrained(cls, *args, **kwargs):
        _models_loaded.append(cls.__name__)
        return _from_pretrained(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(_counting_from_pretrained)

    _prepare = Accelerator.prepare

    def _recording_prepare(self, *args, **kwargs):
        result = _prepare(self, *args, **kwargs)
        prepared = result if isinstance(result, (tuple, list)) else (result,)
        models = [obj for obj in prepared if isinstance(obj, torch.nn.Module)]
        if models:
            state = PartialState()
            dist = torch.distributed
            facts = {
                "distributed_type": str(state.distributed_type),
                "num_processes": state.num_processes,
                "process_index": state.process_index,
                "backend": state.backend,
                "process_group_backend": dist.get_backend() if dist.is_initialized() else None,
                "world_size": dist.get_world_size() if dist.is_initialized() else None,
                "device": str(state.device),
                "cpu_shim": bool(_shim_used),
                "mixed_precision": self.mixed_precision,
                "models_loaded": list(_models_loaded),
                **_model_facts(models[0]),
            }
            directory = os.environ["U2A_FACTS_DIR"]
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"rank{state.process_index}.json"), "w") as f:
                json.dump(facts, f, indent=2)
        return result

    Accelerator.prepare = _recording_prepare

    import atexit
    import logging
    import sys

    _status = []  # the code given to sys.exit (the CLI's way out); any other way out keeps the normal teardown
    _exit, _excepthook = sys.exit, sys.excepthook

    def _recording_exit(code=0):
        _status.append(code if isinstance(code, int) else (0 if code is None else 1))
        _exit(code)

    def _recording_excepthook(kind, value, tb):
        _status.append(1)
        _excepthook(kind, value, tb)

    def _exit_without_native_teardown():
        if not _status:
            return
        # Registered after torch's and logging's handlers, so it runs first: do their flushing here
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status[-1])

    sys.exit, sys.excepthook = _recording_exit, _recording_excepthook
    atexit.register(_exit_without_native_teardown)
