import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from ratchet.v1 import common_pb2 as _common_pb2
from ratchet.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepEvent(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_EVENT_UNSPECIFIED: _ClassVar[StepEvent]
    STEP_EVENT_STARTED: _ClassVar[StepEvent]
    STEP_EVENT_COMPLETED: _ClassVar[StepEvent]
    STEP_EVENT_RETRYING: _ClassVar[StepEvent]
    STEP_EVENT_FAILED: _ClassVar[StepEvent]
STEP_EVENT_UNSPECIFIED: StepEvent
STEP_EVENT_STARTED: StepEvent
STEP_EVENT_COMPLETED: StepEvent
STEP_EVENT_RETRYING: StepEvent
STEP_EVENT_FAILED: StepEvent

class SessionRequest(_message.Message):
    __slots__ = ("request_id", "hello", "heartbeat", "checkpoint", "complete", "slots", "release", "children")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    hello: Hello
    heartbeat: Heartbeat
    checkpoint: Checkpoint
    complete: Complete
    slots: SlotsUpdate
    release: ReleaseLease
    children: TriggerChildren
    def __init__(self, request_id: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., complete: _Optional[_Union[Complete, _Mapping]] = ..., slots: _Optional[_Union[SlotsUpdate, _Mapping]] = ..., release: _Optional[_Union[ReleaseLease, _Mapping]] = ..., children: _Optional[_Union[TriggerChildren, _Mapping]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("request_id", "welcome", "lease", "ack", "cancel")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    welcome: Welcome
    lease: LeaseGrant
    ack: Ack
    cancel: CancelRun
    def __init__(self, request_id: _Optional[int] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., lease: _Optional[_Union[LeaseGrant, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., cancel: _Optional[_Union[CancelRun, _Mapping]] = ...) -> None: ...

class TaskDefinition(_message.Message):
    __slots__ = ("id", "version", "queue", "retry", "payload_schema", "output_schema", "max_duration", "handles_final_error")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FINAL_ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: str
    queue: str
    retry: _common_pb2.RetryPolicy
    payload_schema: bytes
    output_schema: bytes
    max_duration: _duration_pb2.Duration
    handles_final_error: bool
    def __init__(self, id: _Optional[str] = ..., version: _Optional[str] = ..., queue: _Optional[str] = ..., retry: _Optional[_Union[_common_pb2.RetryPolicy, _Mapping]] = ..., payload_schema: _Optional[bytes] = ..., output_schema: _Optional[bytes] = ..., max_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., handles_final_error: _Optional[bool] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("worker_id", "sdk_name", "sdk_version", "protocol_version", "tasks", "slots", "active_lease_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SDK_NAME_FIELD_NUMBER: _ClassVar[int]
    SDK_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    sdk_name: str
    sdk_version: str
    protocol_version: int
    tasks: _containers.RepeatedCompositeFieldContainer[TaskDefinition]
    slots: int
    active_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., sdk_name: _Optional[str] = ..., sdk_version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., tasks: _Optional[_Iterable[_Union[TaskDefinition, _Mapping]]] = ..., slots: _Optional[int] = ..., active_lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "protocol_version", "heartbeat_interval", "lease_ttl", "adopted_lease_ids", "server_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    protocol_version: int
    heartbeat_interval: _duration_pb2.Duration
    lease_ttl: _duration_pb2.Duration
    adopted_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    server_version: str
    def __init__(self, session_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., adopted_lease_ids: _Optional[_Iterable[str]] = ..., server_version: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("active_lease_ids",)
    ACTIVE_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    active_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, active_lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SlotsUpdate(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: int
    def __init__(self, slots: _Optional[int] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("payload", "steps", "state")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.Step]
    state: bytes
    def __init__(self, payload: _Optional[bytes] = ..., steps: _Optional[_Iterable[_Union[_common_pb2.Step, _Mapping]]] = ..., state: _Optional[bytes] = ...) -> None: ...

class LeaseGrant(_message.Message):
    __slots__ = ("lease_id", "run_id", "task_id", "attempt", "snapshot", "expires_at", "retry", "sent_at", "final_error")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    FINAL_ERROR_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    run_id: str
    task_id: str
    attempt: int
    snapshot: Snapshot
    expires_at: _timestamp_pb2.Timestamp
    retry: _common_pb2.RetryPolicy
    sent_at: _timestamp_pb2.Timestamp
    final_error: _common_pb2.ErrorInfo
    def __init__(self, lease_id: _Optional[str] = ..., run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retry: _Optional[_Union[_common_pb2.RetryPolicy, _Mapping]] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., final_error: _Optional[_Union[_common_pb2.ErrorInfo, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("lease_id", "run_id", "step_key", "kind", "event", "attempt", "output", "error", "started_at", "finished_at", "state", "retry_base", "retry_at", "wake_at", "token_id", "wake_after", "retry_after", "existing_token")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETRY_BASE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AT_FIELD_NUMBER: _ClassVar[int]
    WAKE_AT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    WAKE_AFTER_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    EXISTING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    run_id: str
    step_key: str
    kind: _common_pb2.StepKind
    event: StepEvent
    attempt: int
    output: bytes
    error: _common_pb2.ErrorInfo
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    state: bytes
    retry_base: int
    retry_at: _timestamp_pb2.Timestamp
    wake_at: _timestamp_pb2.Timestamp
    token_id: str
    wake_after: _duration_pb2.Duration
    retry_after: _duration_pb2.Duration
    existing_token: bool
    def __init__(self, lease_id: _Optional[str] = ..., run_id: _Optional[str] = ..., step_key: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.StepKind, str]] = ..., event: _Optional[_Union[StepEvent, str]] = ..., attempt: _Optional[int] = ..., output: _Optional[bytes] = ..., error: _Optional[_Union[_common_pb2.ErrorInfo, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[bytes] = ..., retry_base: _Optional[int] = ..., retry_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., wake_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., token_id: _Optional[str] = ..., wake_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., existing_token: _Optional[bool] = ...) -> None: ...

class Succeeded(_message.Message):
    __slots__ = ("output",)
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    output: bytes
    def __init__(self, output: _Optional[bytes] = ...) -> None: ...

class Failed(_message.Message):
    __slots__ = ("error", "retry_at", "retry_after")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRY_AT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    error: _common_pb2.ErrorInfo
    retry_at: _timestamp_pb2.Timestamp
    retry_after: _duration_pb2.Duration
    def __init__(self, error: _Optional[_Union[_common_pb2.ErrorInfo, _Mapping]] = ..., retry_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Suspended(_message.Message):
    __slots__ = ("step_keys",)
    STEP_KEYS_FIELD_NUMBER: _ClassVar[int]
    step_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class Complete(_message.Message):
    __slots__ = ("lease_id", "run_id", "succeeded", "failed", "suspended", "state")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    run_id: str
    succeeded: Succeeded
    failed: Failed
    suspended: Suspended
    state: bytes
    def __init__(self, lease_id: _Optional[str] = ..., run_id: _Optional[str] = ..., succeeded: _Optional[_Union[Succeeded, _Mapping]] = ..., failed: _Optional[_Union[Failed, _Mapping]] = ..., suspended: _Optional[_Union[Suspended, _Mapping]] = ..., state: _Optional[bytes] = ...) -> None: ...

class ReleaseLease(_message.Message):
    __slots__ = ("lease_id", "run_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    run_id: str
    def __init__(self, lease_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class TriggerChildren(_message.Message):
    __slots__ = ("lease_id", "run_id", "step_key", "items", "wait")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    run_id: str
    step_key: str
    items: _containers.RepeatedCompositeFieldContainer[_run_pb2.BatchTriggerItem]
    wait: bool
    def __init__(self, lease_id: _Optional[str] = ..., run_id: _Optional[str] = ..., step_key: _Optional[str] = ..., items: _Optional[_Iterable[_Union[_run_pb2.BatchTriggerItem, _Mapping]]] = ..., wait: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("code", "message", "run_ids")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., run_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CancelRun(_message.Message):
    __slots__ = ("run_id", "lease_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    lease_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
