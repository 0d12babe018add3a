"""Write stand-in Metta classes at each era's module path, then torch.save one file per era.

Run as a script in a subprocess: ``python make_eras.py OUT_DIR``. The stand-in modules are
written to ``OUT_DIR/src`` and imported only by this subprocess; the test process, which
imports the resulting files with mettaformat, never has them on its path. For every file a
``<name>.expected.pt`` holds the reference state dict (``module.state_dict()``), legacy-graph
tensors, and metadata, saved with plain tensors so that ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

STANDINS = {
    # Era A0/A1: agent/ at the repository root.
    "agent/__init__.py": "",
    "agent/policy_store.py": """
        class PolicyRecord:
            def __init__(self, policy_store, name, uri, metadata):
                self._policy_store = policy_store
                self.name = name
                self.uri = uri
                self.metadata = metadata
                self._policy = None
                self._local_path = uri[len("file://"):] if uri.startswith("file://") else None
    """,
    "agent/metta_agent.py": "from metta_common import MettaAgent\nMettaAgent.__module__ = __name__\n",
    "pufferlib/__init__.py": "",
    "pufferlib/cleanrl.py": """
        import torch.nn as nn
        class RecurrentPolicy(nn.Module):
            def __init__(self, policy):
                super().__init__()
                self.policy = policy
                self._action_names = ["move", "noop"]
                self._grid_features = ["hp", "agent"]
    """,
    # Era A2..D: metta/agent/.
    "metta/__init__.py": "",
    "metta/agent/__init__.py": "",
    "metta/agent/policy_store.py": """
        from agent.policy_store import PolicyRecord as _P
        class PolicyRecord(_P):
            pass
    """,
    "metta/agent/metta_agent.py": "from metta_common import MettaAgent\nMettaAgent.__module__ = __name__\n",
    "metta/agent/policy_metadata.py": """
        class PolicyMetadata(dict):
            def __init__(self, agent_step=0, epoch=0, generation=0, train_time=0.0, **kwargs):
                super().__init__(
                    agent_step=agent_step, epoch=epoch, generation=generation, train_time=train_time, **kwargs
                )
    """,
    "metta/agent/policy_record.py": """
        class PolicyRecord:
            def __init__(self, policy_store, name, uri, metadata, *, era="D"):
                self._policy_store = policy_store
                if era == "C":
                    self.name = name
                else:
                    self.run_name = name
                self.uri = uri
                self._metadata = metadata
                self._cached_policy = None
    """,
    "metta/agent/component_policies/__init__.py": "",
    "metta/agent/component_policies/fast.py": """
        import torch.nn as nn
        class Fast(nn.Module):
            def __init__(self, components, agent_attributes):
                super().__init__()
                self.components = components
                self.agent_attributes = agent_attributes
    """,
    "metta/agent/brain_policy.py": "from metta_common import MettaAgent as _M\nclass BrainPolicy(_M):\n    pass\n",
    "metta/agent/policy_auto_builder.py": """
        import torch.nn as nn
        class PolicyAutoBuilder(nn.Module):
            def __init__(self, net):
                super().__init__()
                self.network = net
                self.config = {"name": "vit"}
    """,
    "metta/agent/lib/__init__.py": "",
    "metta/agent/lib/nn_layer_library.py": """
        import torch, torch.nn as nn
        class Linear(nn.Module):
            def __init__(self, i, o, bias=True):
                super().__init__()
                self._net = nn.Sequential(nn.Linear(i, o, bias=bias), nn.ReLU())
                self.initial_weights = self._net[0].weight.detach().clone()
                self._sources = [{"name": "obs"}]
    """,
    "metta_common.py": """
        import torch, torch.nn as nn
        class Normalizer(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("obs_norm", torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1))
                self.register_buffer("scratch", torch.ones(3), persistent=False)
                self.register_buffer("unused", None)
        class MettaAgent(nn.Module):
            def __init__(self, components, agent_attributes=None):
                super().__init__()
                self.components = components
                self.hidden_size = 8
                if agent_attributes is not None:
                    self.agent_attributes = agent_attributes
                self.action_names = ["move", "noop"]
                self.cum_action_max_params = torch.tensor([0, 3, 4])
    """,
}


def write_standins(src: Path) -> None:
    for rel, text in STANDINS.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def build_files(out: Path) -> None:
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    from metta.agent.lib.nn_layer_library import Linear
    from metta_common import Normalizer

    def components() -> nn.ModuleDict:
        comps = nn.ModuleDict({"obs_normalizer": Normalizer(), "fc1": Linear(6, 4), "head": Linear(4, 2, bias=False)})
        # Tied weight: two parameters on one storage must stay shared (F23).
        comps["tied"] = Linear(4, 2, bias=False)
        comps["tied"]._net[0].weight = comps["head"]._net[0].weight
        return comps

    attrs = {"obs_width": 11, "obs_height": 11, "feature_normalizations": {0: 1.0, 1: 30.0}, "obs_shape": (200, 3)}
    md = {
        "agent_step": 128,
        "epoch": 2,
        "generation": 1,
        "train_time": 1.5,
        "action_names": ["move", "noop"],
        "score": 0.25,
    }

    def save(name: str, obj: object, model: nn.Module | None, metadata: dict, **kw: object) -> None:
        torch.save(obj, out / f"{name}.pt", **kw)
        expected = {"state": model.state_dict() if model is not None else {}, "metadata": metadata}
        torch.save(expected, out / f"{name}.expected.pt")

    import agent.metta_agent as a_agent
    import agent.policy_store as a_store
    import metta.agent.brain_policy as brain
    import metta.agent.component_policies.fast as fast
    import metta.agent.metta_agent as m_agent
    import metta.agent.policy_auto_builder as builder
    import metta.agent.policy_metadata as pmd
    import metta.agent.policy_record as prec
    import metta.agent.policy_store as m_store
    import pufferlib.cleanrl as cleanrl

    # A0: pufferlib wrapper around the component agent.
    policy = cleanrl.RecurrentPolicy(a_agent.MettaAgent(components()))
    pr = a_store.PolicyRecord(None, "/ckpt/model_0002.pt", "file:///ckpt/model_0002.pt", dict(md))
    pr._policy = policy
    save("era_a0", pr, policy, md)
    # A1: component agent directly.
    agent = a_agent.MettaAgent(components())
    pr = a_store.PolicyRecord(None, "/ckpt/model_0002.pt", "file:///ckpt/model_0002.pt", dict(md))
    pr._policy = agent
    save("era_a1", pr, agent, md)
    # A2: metta.agent.*, agent_attributes on the agent.
    agent = m_agent.MettaAgent(components(), dict(attrs))
    pr = m_store.PolicyRecord(None, "/ckpt/model_0002.pt", "file:///ckpt/model_0002.pt", dict(md))
    pr._policy = agent
    save("era_a2", pr, agent, md)
    # C: name + _metadata (PolicyMetadata) + _cached_policy.
    agent = m_agent.MettaAgent(components(), dict(attrs))
    pr = prec.PolicyRecord(None, "model_0002.pt", "file://ckpt/model_0002.pt", pmd.PolicyMetadata(**md), era="C")
    pr._cached_policy = agent
    save("era_c", pr, agent, md)
    # D: run_name.
    agent = m_agent.MettaAgent(components(), dict(attrs))
    pr = prec.PolicyRecord(None, "model_0002.pt", "file://ckpt/model_0002.pt", pmd.PolicyMetadata(**md))
    pr._cached_policy = agent
    save("era_d", pr, agent, md)
    # D with the `policy` submodule (Aug 2025).
    agent = m_agent.MettaAgent(nn.ModuleDict())
    del agent.components
    agent.policy = fast.Fast(components(), dict(attrs))
    pr = prec.PolicyRecord(None, "model_0002.pt", "file://ckpt/model_0002.pt", pmd.PolicyMetadata(**md))
    pr._cached_policy = agent
    save("era_d2", pr, agent, md)
    # E: a bare module.
    model = builder.PolicyAutoBuilder(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    save("era_e", model, model, {})
    # v2 standard and full-model dicts (PR #973).
    bp = brain.BrainPolicy(components(), dict(attrs))
    v2 = {
        "model_state_dict": bp.state_dict(),
        "model_type": "brain",
        "name": "model_0002.pt",
        "uri": "file://ckpt/model_0002.pt",
        "metadata": dict(md),
        "observation_space_version": None,
        "action_space_version": None,
        "layer_version": None,
        "checkpoint_format_version": 2,
        "agent_attributes": dict(attrs),
    }
    save("v2_standard", v2, bp, md)
    full = {
        "model": bp,
        "model_type": "brain",
        "name": "model_0002.pt",
        "uri": "file://ckpt/model_0002.pt",
        "metadata": dict(md),
        "checkpoint_format_version": 2,
    }
    save("v2_full", full, bp, md)
    # Raw state dict and a pre-1.6 legacy stream of an era-D record.
    save("raw_state_dict", agent.state_dict(), agent, {})
    save("legacy_stream_d", pr, agent, md, _use_new_zipfile_serialization=False)
    # trainer_state.pt shapes (docs/legacy-formats.md 3).
    opt = torch.optim.Adam(bp.parameters(), lr=1e-3)
    for p in bp.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    shapes = {
        "trainer_2024": {
            "optimizer_state_dict": opt.state_dict(),
            "agent_step": 10,
            "epoch": 1,
            "policy_path": "/ckpt/model_0001.pt",
        },
        "trainer_2025": {
            "optimizer_state_dict": opt.state_dict(),
            "agent_step": 10,
            "epoch": 1,
            "total_agent_step": 20,
            "policy_path": "file:///ckpt/model_0001.pt",
            "stopwatch_state": {"t": 1.0},
            "teacher_pr_uri": None,
        },
        "trainer_era_e": {"optimizer": opt.state_dict(), "epoch": 1, "agent_step": 10},
    }
    for name, obj in shapes.items():
        torch.save(obj, out / f"{name}.pt")
        torch.save({"state": {}, "metadata": {}, "optimizer": opt.state_dict()}, out / f"{name}.expected.pt")


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    src_dir = out_dir / "src"
    write_standins(src_dir)
    sys.path.insert(0, str(src_dir))
    build_files(out_dir)
