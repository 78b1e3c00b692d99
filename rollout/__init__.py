"""The MoE rollout engine: generation with a paged KV cache and routed-expert capture.

``LLM`` generates; ``SamplingParams`` sets how each request samples and stops;
``RequestOutput`` is one finished request; ``RoutingSpec`` describes the model's routing
(``LLM.routing_spec``); ``EngineStats`` its counters (``LLM.stats``); ``resolve_model`` turns
a checkpoint folder or a Hugging Face Hub id into the local folder every loader reads.
``load_policy`` returns the engine's model as a trainable module (``Policy``), bitwise equal to
a deterministic engine.
"""

from rollout.hub import resolve_model
from rollout.llm import LLM
from rollout.outputs import EngineStats, RequestOutput, RoutingSpec
from rollout.policy import Policy, load_policy
from rollout.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "EngineStats",
    "Policy",
    "RequestOutput",
    "RoutingSpec",
    "SamplingParams",
    "load_policy",
    "resolve_model",
]
