from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_STATE_UNSPECIFIED: _ClassVar[SearchState]
    SEARCH_STATE_QUEUED: _ClassVar[SearchState]
    SEARCH_STATE_RUNNING: _ClassVar[SearchState]
    SEARCH_STATE_SUCCEEDED: _ClassVar[SearchState]
    SEARCH_STATE_FAILED: _ClassVar[SearchState]
    SEARCH_STATE_CANCELLED: _ClassVar[SearchState]
SEARCH_STATE_UNSPECIFIED: SearchState
SEARCH_STATE_QUEUED: SearchState
SEARCH_STATE_RUNNING: SearchState
SEARCH_STATE_SUCCEEDED: SearchState
SEARCH_STATE_FAILED: SearchState
SEARCH_STATE_CANCELLED: SearchState

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class Problem(_message.Message):
    __slots__ = ("text", "chat")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatMessages
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ...) -> None: ...

class GreedyParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ...) -> None: ...

class BestOfNParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter", "aggregation", "n")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    aggregation: str
    n: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ..., aggregation: _Optional[str] = ..., n: _Optional[int] = ...) -> None: ...

class SelfConsistencyParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter", "n")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    n: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ..., n: _Optional[int] = ...) -> None: ...

class BeamParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter", "aggregation", "n", "m", "selection", "stop_after", "final_round", "filter_duplicates")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    STOP_AFTER_FIELD_NUMBER: _ClassVar[int]
    FINAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    FILTER_DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    aggregation: str
    n: int
    m: int
    selection: str
    stop_after: int
    final_round: bool
    filter_duplicates: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ..., aggregation: _Optional[str] = ..., n: _Optional[int] = ..., m: _Optional[int] = ..., selection: _Optional[str] = ..., stop_after: _Optional[int] = ..., final_round: _Optional[bool] = ..., filter_duplicates: _Optional[bool] = ...) -> None: ...

class DvtsParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter", "aggregation", "n", "m", "selection", "final_round")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    FINAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    aggregation: str
    n: int
    m: int
    selection: str
    final_round: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ..., aggregation: _Optional[str] = ..., n: _Optional[int] = ..., m: _Optional[int] = ..., selection: _Optional[str] = ..., final_round: _Optional[bool] = ...) -> None: ...

class ParticleFilterParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter", "aggregation", "n", "softmax_temperature", "resampling", "finished", "selection", "ess_threshold")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    RESAMPLING_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    ESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    aggregation: str
    n: int
    softmax_temperature: float
    resampling: str
    finished: str
    selection: str
    ess_threshold: float
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ..., aggregation: _Optional[str] = ..., n: _Optional[int] = ..., softmax_temperature: _Optional[float] = ..., resampling: _Optional[str] = ..., finished: _Optional[str] = ..., selection: _Optional[str] = ..., ess_threshold: _Optional[float] = ...) -> None: ...

class EntropicParticleFilterParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter", "aggregation", "n", "softmax_temperature", "resampling", "finished", "selection", "ess_threshold", "early_phase", "schedule", "lookahead", "lam")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    RESAMPLING_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    ESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EARLY_PHASE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    LAM_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    aggregation: str
    n: int
    softmax_temperature: float
    resampling: str
    finished: str
    selection: str
    ess_threshold: float
    early_phase: float
    schedule: str
    lookahead: bool
    lam: float
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ..., aggregation: _Optional[str] = ..., n: _Optional[int] = ..., softmax_temperature: _Optional[float] = ..., resampling: _Optional[str] = ..., finished: _Optional[str] = ..., selection: _Optional[str] = ..., ess_threshold: _Optional[float] = ..., early_phase: _Optional[float] = ..., schedule: _Optional[str] = ..., lookahead: _Optional[bool] = ..., lam: _Optional[float] = ...) -> None: ...

class ParticleGibbsParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter", "aggregation", "n", "softmax_temperature", "resampling", "finished", "selection", "ess_threshold", "num_iterations", "num_ref_particles")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    RESAMPLING_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    ESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NUM_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_REF_PARTICLES_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    aggregation: str
    n: int
    softmax_temperature: float
    resampling: str
    finished: str
    selection: str
    ess_threshold: float
    num_iterations: int
    num_ref_particles: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ..., aggregation: _Optional[str] = ..., n: _Optional[int] = ..., softmax_temperature: _Optional[float] = ..., resampling: _Optional[str] = ..., finished: _Optional[str] = ..., selection: _Optional[str] = ..., ess_threshold: _Optional[float] = ..., num_iterations: _Optional[int] = ..., num_ref_particles: _Optional[int] = ...) -> None: ...

class AStarParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter", "aggregation", "n", "k", "max_expansions", "batch_width", "step_cost", "cost_weight", "selection")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_EXPANSIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEP_COST_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    aggregation: str
    n: int
    k: int
    max_expansions: int
    batch_width: int
    step_cost: str
    cost_weight: float
    selection: str
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ..., aggregation: _Optional[str] = ..., n: _Optional[int] = ..., k: _Optional[int] = ..., max_expansions: _Optional[int] = ..., batch_width: _Optional[int] = ..., step_cost: _Optional[str] = ..., cost_weight: _Optional[float] = ..., selection: _Optional[str] = ...) -> None: ...

class EarlyRejectionParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter", "tau", "keep", "rescore", "beam", "dvts", "pf", "epf", "astar")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DELIMITER_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    RESCORE_FIELD_NUMBER: _ClassVar[int]
    BEAM_FIELD_NUMBER: _ClassVar[int]
    DVTS_FIELD_NUMBER: _ClassVar[int]
    PF_FIELD_NUMBER: _ClassVar[int]
    EPF_FIELD_NUMBER: _ClassVar[int]
    ASTAR_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_steps: int
    max_step_tokens: int
    step_delimiter: str
    tau: int
    keep: float
    rescore: bool
    beam: BeamParams
    dvts: DvtsParams
    pf: ParticleFilterParams
    epf: EntropicParticleFilterParams
    astar: AStarParams
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., step_delimiter: _Optional[str] = ..., tau: _Optional[int] = ..., keep: _Optional[float] = ..., rescore: _Optional[bool] = ..., beam: _Optional[_Union[BeamParams, _Mapping]] = ..., dvts: _Optional[_Union[DvtsParams, _Mapping]] = ..., pf: _Optional[_Union[ParticleFilterParams, _Mapping]] = ..., epf: _Optional[_Union[EntropicParticleFilterParams, _Mapping]] = ..., astar: _Optional[_Union[AStarParams, _Mapping]] = ...) -> None: ...

class AlgorithmParams(_message.Message):
    __slots__ = ("greedy", "best_of_n", "weighted_best_of_n", "self_consistency", "beam", "dvts", "pf", "epf", "astar", "early_rejection", "pg")
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    BEST_OF_N_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_BEST_OF_N_FIELD_NUMBER: _ClassVar[int]
    SELF_CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    BEAM_FIELD_NUMBER: _ClassVar[int]
    DVTS_FIELD_NUMBER: _ClassVar[int]
    PF_FIELD_NUMBER: _ClassVar[int]
    EPF_FIELD_NUMBER: _ClassVar[int]
    ASTAR_FIELD_NUMBER: _ClassVar[int]
    EARLY_REJECTION_FIELD_NUMBER: _ClassVar[int]
    PG_FIELD_NUMBER: _ClassVar[int]
    greedy: GreedyParams
    best_of_n: BestOfNParams
    weighted_best_of_n: BestOfNParams
    self_consistency: SelfConsistencyParams
    beam: BeamParams
    dvts: DvtsParams
    pf: ParticleFilterParams
    epf: EntropicParticleFilterParams
    astar: AStarParams
    early_rejection: EarlyRejectionParams
    pg: ParticleGibbsParams
    def __init__(self, greedy: _Optional[_Union[GreedyParams, _Mapping]] = ..., best_of_n: _Optional[_Union[BestOfNParams, _Mapping]] = ..., weighted_best_of_n: _Optional[_Union[BestOfNParams, _Mapping]] = ..., self_consistency: _Optional[_Union[SelfConsistencyParams, _Mapping]] = ..., beam: _Optional[_Union[BeamParams, _Mapping]] = ..., dvts: _Optional[_Union[DvtsParams, _Mapping]] = ..., pf: _Optional[_Union[ParticleFilterParams, _Mapping]] = ..., epf: _Optional[_Union[EntropicParticleFilterParams, _Mapping]] = ..., astar: _Optional[_Union[AStarParams, _Mapping]] = ..., early_rejection: _Optional[_Union[EarlyRejectionParams, _Mapping]] = ..., pg: _Optional[_Union[ParticleGibbsParams, _Mapping]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("max_generated_tokens", "max_prm_passes")
    MAX_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PRM_PASSES_FIELD_NUMBER: _ClassVar[int]
    max_generated_tokens: int
    max_prm_passes: int
    def __init__(self, max_generated_tokens: _Optional[int] = ..., max_prm_passes: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("problem", "params", "budget", "seed", "search_id", "policy_model", "reward_model")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_MODEL_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    problem: Problem
    params: AlgorithmParams
    budget: Budget
    seed: int
    search_id: str
    policy_model: str
    reward_model: str
    def __init__(self, problem: _Optional[_Union[Problem, _Mapping]] = ..., params: _Optional[_Union[AlgorithmParams, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., seed: _Optional[int] = ..., search_id: _Optional[str] = ..., policy_model: _Optional[str] = ..., reward_model: _Optional[str] = ...) -> None: ...

class Spend(_message.Message):
    __slots__ = ("generated_tokens", "prompt_tokens", "prm_passes", "prm_tokens", "policy_calls", "reward_calls", "steps", "wall_time_s")
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRM_PASSES_FIELD_NUMBER: _ClassVar[int]
    PRM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICY_CALLS_FIELD_NUMBER: _ClassVar[int]
    REWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    generated_tokens: int
    prompt_tokens: int
    prm_passes: int
    prm_tokens: int
    policy_calls: int
    reward_calls: int
    steps: int
    wall_time_s: float
    def __init__(self, generated_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., prm_passes: _Optional[int] = ..., prm_tokens: _Optional[int] = ..., policy_calls: _Optional[int] = ..., reward_calls: _Optional[int] = ..., steps: _Optional[int] = ..., wall_time_s: _Optional[float] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("text", "steps", "final_answer", "score", "weight", "finished", "stop", "rewards")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_ANSWER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    steps: _containers.RepeatedScalarFieldContainer[str]
    final_answer: str
    score: float
    weight: float
    finished: bool
    stop: str
    rewards: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, text: _Optional[str] = ..., steps: _Optional[_Iterable[str]] = ..., final_answer: _Optional[str] = ..., score: _Optional[float] = ..., weight: _Optional[float] = ..., finished: _Optional[bool] = ..., stop: _Optional[str] = ..., rewards: _Optional[_Iterable[float]] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("search_id", "algorithm", "answer", "final_answer", "candidates", "chosen", "spend", "stop_reason")
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    FINAL_ANSWER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    SPEND_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    algorithm: str
    answer: str
    final_answer: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    chosen: int
    spend: Spend
    stop_reason: str
    def __init__(self, search_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., answer: _Optional[str] = ..., final_answer: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., chosen: _Optional[int] = ..., spend: _Optional[_Union[Spend, _Mapping]] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class SearchProgress(_message.Message):
    __slots__ = ("step", "spend", "best_partial", "best_final_answer")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SPEND_FIELD_NUMBER: _ClassVar[int]
    BEST_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    BEST_FINAL_ANSWER_FIELD_NUMBER: _ClassVar[int]
    step: int
    spend: Spend
    best_partial: str
    best_final_answer: str
    def __init__(self, step: _Optional[int] = ..., spend: _Optional[_Union[Spend, _Mapping]] = ..., best_partial: _Optional[str] = ..., best_final_answer: _Optional[str] = ...) -> None: ...

class SearchEvent(_message.Message):
    __slots__ = ("search_id", "progress", "result")
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    progress: SearchProgress
    result: SearchResult
    def __init__(self, search_id: _Optional[str] = ..., progress: _Optional[_Union[SearchProgress, _Mapping]] = ..., result: _Optional[_Union[SearchResult, _Mapping]] = ...) -> None: ...

class GetSearchRequest(_message.Message):
    __slots__ = ("search_id",)
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    def __init__(self, search_id: _Optional[str] = ...) -> None: ...

class CancelSearchRequest(_message.Message):
    __slots__ = ("search_id",)
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    def __init__(self, search_id: _Optional[str] = ...) -> None: ...

class SearchStatus(_message.Message):
    __slots__ = ("search_id", "state", "algorithm", "result", "error", "created_at", "finished_at")
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    state: SearchState
    algorithm: str
    result: SearchResult
    error: str
    created_at: float
    finished_at: float
    def __init__(self, search_id: _Optional[str] = ..., state: _Optional[_Union[SearchState, str]] = ..., algorithm: _Optional[str] = ..., result: _Optional[_Union[SearchResult, _Mapping]] = ..., error: _Optional[str] = ..., created_at: _Optional[float] = ..., finished_at: _Optional[float] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("problem", "seed", "key")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    problem: Problem
    seed: int
    key: str
    def __init__(self, problem: _Optional[_Union[Problem, _Mapping]] = ..., seed: _Optional[int] = ..., key: _Optional[str] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("items", "params", "budget", "seed", "batch_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    params: AlgorithmParams
    budget: Budget
    seed: int
    batch_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ..., params: _Optional[_Union[AlgorithmParams, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., seed: _Optional[int] = ..., batch_id: _Optional[str] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class CancelBatchRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class BatchStatus(_message.Message):
    __slots__ = ("batch_id", "size", "succeeded", "failed", "cancelled", "done", "created_at")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    size: int
    succeeded: int
    failed: int
    cancelled: int
    done: bool
    created_at: float
    def __init__(self, batch_id: _Optional[str] = ..., size: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., done: _Optional[bool] = ..., created_at: _Optional[float] = ...) -> None: ...

class StreamBatchResultsRequest(_message.Message):
    __slots__ = ("batch_id", "after")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    after: int
    def __init__(self, batch_id: _Optional[str] = ..., after: _Optional[int] = ...) -> None: ...

class BatchItemResult(_message.Message):
    __slots__ = ("offset", "index", "key", "status")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    index: int
    key: str
    status: SearchStatus
    def __init__(self, offset: _Optional[int] = ..., index: _Optional[int] = ..., key: _Optional[str] = ..., status: _Optional[_Union[SearchStatus, _Mapping]] = ...) -> None: ...
