"""The optimizer zoo: sgd | signum | adam | adamw | mada, second-moment granularity, rotations.

``build_optimizer(model, opt_cfg, rotation_cfg)`` returns a ``torch.optim.Optimizer``; see
``python -m rayexp.optim --list`` for names, options and memory. On CUDA each step runs as one compiled
multi-tensor function per family (``rayexp.optim.fused``; ``optimizer.fused``).
"""
from rayexp.optim.core import Family, ZooOptimizer
from rayexp.optim.registry import (OPTIMIZERS, build_optimizer, is_elementwise, param_groups,
                                   state_bytes_per_param)
from rayexp.optim.rotation import FlatRotation, Rotation, haar_orthogonal, rotation_memory, training_rotation

__all__ = ["OPTIMIZERS", "build_optimizer", "is_elementwise", "param_groups", "state_bytes_per_param",
           "Family", "ZooOptimizer", "Rotation", "FlatRotation", "haar_orthogonal", "rotation_memory",
           "training_rotation"]
