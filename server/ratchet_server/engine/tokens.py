"""Wait tokens from anywhere: created by a client (CreateToken) outside any
run, passed to a run as data, waited on there, completed with CompleteToken
or over HTTP on the token's URL.

Tokens a run creates itself (ctx.create_token) are token steps and stay
with RunsMixin; completing a token tries this table first, then those.
Where the rules meet the row locks (the store's _tokens.py): a run's wait on
a token is decided by `policy.token_wait` under the run's row lock and then
the token's; a completion locks the waiting run first too.
"""

from __future__ import annotations

import hmac
import secrets

from ratchet_server import clock, model
from ratchet_server.engine import errors, ids, policy, validate
from ratchet_server.engine.core import MAX_PAYLOAD_BYTES, Session, decode_json
from ratchet_server.engine.runs import RunsMixin

MAX_IDEMPOTENCY_KEY = 256


class TokensMixin(RunsMixin):
    """CreateToken, GetToken, ListTokens, a run's wait on a created token,
    and completing one (by id, or by the secret in its URL)."""

    async def create_token(
        self, env: str, *, timeout: float | None, idempotency_key: str,
        tags: tuple[str, ...],
    ) -> tuple[model.Token, bool]:
        """A new WAITING token, or the one `idempotency_key` already names."""
        validate.duration(timeout, "timeout")
        validate.tags(tags)
        validate.text(idempotency_key, "idempotency_key", MAX_IDEMPOTENCY_KEY)
        now = clock.now()
        token = model.Token(
            id=ids.new_id("tok"), env=env, secret=secrets.token_urlsafe(32),
            status=model.TokenStatus.WAITING, data=None, tags=tuple(tags),
            idempotency_key=idempotency_key or None, created_at=now,
            expires_at=None if timeout is None else now + timeout, completed_at=None)
        return await self.store.create_token(token)

    async def get_token(self, env: str, token_id: str) -> model.Token:
        token = await self.store.get_token(env, token_id) if token_id else None
        if token is None:
            raise errors.NotFound(f"token {token_id!r} not found")
        return token

    async def list_tokens(self, flt: model.TokenFilter, page_size: int,
                          page_token: str) -> tuple[list[model.Token], str]:
        validate.tags(flt.tags)
        if flt.run_id:
            validate.text(flt.run_id, "run_id")
        limit = min(max(page_size or 50, 1), 1000)
        cursor = validate.list_page_token(page_token)
        tokens = await self.store.list_tokens(flt, limit + 1, cursor)
        if flt.run_id:
            tokens = await self._with_run_tokens(flt, flt.run_id, tokens, limit + 1, cursor)
        if len(tokens) <= limit:
            return tokens, ""
        last = tokens[limit - 1]
        return tokens[:limit], f"{last.created_at!r}|{last.id}"

    async def _with_run_tokens(self, flt: model.TokenFilter, run_id: str,
                               created: list[model.Token], limit: int,
                               cursor: tuple[float, str] | None) -> list[model.Token]:
        """A run's tokens: those created outside it that it waits on (the
        store's page) and those it created itself (its token steps), in one
        order, newest first. A run's steps are few, so they are read whole."""
        run = await self.store.get_run(flt.env, run_id)
        if run is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        known = {t.id for t in created}
        now = clock.now()
        for step in await self.store.get_steps(run_id):
            if step.kind is not model.StepKind.TOKEN or not step.token_id:
                continue
            if step.token_id in known or flt.tags:  # a run's own tokens carry no tags
                continue
            token = token_of_step(step, run, now)
            if flt.statuses and token.status not in flt.statuses:
                continue
            if cursor is not None and (token.created_at, token.id) >= cursor:
                continue
            if await self.store.get_token(flt.env, token.id) is not None:
                continue  # created outside the run, listed on its own terms
            created.append(token)
        created.sort(key=lambda t: (t.created_at, t.id), reverse=True)
        return created[:limit]

    async def wait_on_token(
        self, session: Session, *, run_id: str, lease_id: str, key: str, attempt: int,
        retry_base: int, token_id: str, started_at: float | None, state: bytes | None,
    ) -> None:
        """A run under lease starts waiting on a token created outside it
        (Checkpoint.existing_token). Raises StaleLease, InvalidArgument (an
        unknown token, or one another run waits on)."""
        if not key:
            raise errors.InvalidArgument("step_key must not be empty")
        if attempt < 1:
            raise errors.InvalidArgument("attempt is 1-based")
        if not token_id:
            raise errors.InvalidArgument("a token step needs a token_id")
        base = model.StepWrite(
            run_id=run_id, lease_id=lease_id, key=key, kind=model.StepKind.TOKEN,
            status=model.StepStatus.RUNNING, attempt=attempt, retry_base=retry_base,
            output=None, error=None, started_at=started_at, finished_at=None,
            state=self._state(state), token_id=token_id, env=session.env, owner=session.id,
            events=())
        done = await self.store.wait_on_token(base, policy.token_wait(base))
        if isinstance(done, str):
            raise errors.InvalidArgument(done)
        if not done:
            self._forget_lease(lease_id)
            raise errors.StaleLease(f"lease {lease_id!r} of run {run_id!r} is no longer current")

    async def complete_token(self, env: str, token_id: str, data: bytes) -> tuple[bool, str, str]:
        """Deliver data to a token; (completed, run id, why not). A token
        created with CreateToken first, else a token a run created."""
        text = decode_json(data or b"null", "data", MAX_PAYLOAD_BYTES)
        done = await self._complete_created(env, token_id, text)
        if done is None:
            return await super().complete_token(env, token_id, data)
        return done.completed, done.token.run_id or "", explain(done, clock.now())

    async def complete_token_url(self, token_id: str, secret: str,
                                 data: bytes) -> tuple[model.TokenCompletion, str]:
        """Complete a token by its URL: NotFound unless `secret` is the
        token's (the same answer for an unknown id). The data is checked
        after the secret, so a wrong secret learns nothing."""
        # A path may carry anything (%00 included): such an id names no token.
        usable = token_id and len(token_id) <= validate.MAX_NAME and "\x00" not in token_id
        token = await self.store.get_token(None, token_id) if usable else None
        if token is None or not hmac.compare_digest(token.secret.encode(), secret.encode()):
            raise errors.NotFound("no such token URL")
        text = decode_json(data or b"null", "data", MAX_PAYLOAD_BYTES)
        done = await self._complete_created(token.env, token_id, text)
        if done is None:  # deleted meanwhile: tokens are never deleted today
            raise errors.NotFound("no such token URL")
        return done, explain(done, clock.now())

    async def _complete_created(self, env: str, token_id: str,
                                text: str) -> model.TokenCompletion | None:
        if not token_id:
            return None
        now = clock.now()
        done = await self.store.complete_token(
            env, token_id, text,
            lambda step: policy.token_outcome(step, text, now), policy.counts_as_woken)
        if done is not None and done.woken:
            self._wake.set()
        return done


def token_of_step(step: model.Step, run: model.Run, now: float) -> model.Token:
    """A token a run created itself (ctx.create_token), as a listing shows
    it at `now`, from its token step: WAITING while the step runs and its run
    is not final (until its timeout, the step's wake_at), COMPLETED with the
    data the step completed with, otherwise TIMED_OUT: the step timed out, its
    timeout passed, or the run ended (canceled, timed out) before anyone
    completed it. Either way completing it is refused. (TokenStatus has no
    value of its own for a token whose run ended.) It has no secret, URL or
    tags."""
    status = {model.StepStatus.RUNNING: model.TokenStatus.WAITING,
              model.StepStatus.COMPLETED: model.TokenStatus.COMPLETED}.get(
                  step.status, model.TokenStatus.TIMED_OUT)
    if status is model.TokenStatus.WAITING and (
            run.status.is_final or (step.wake_at is not None and step.wake_at <= now)):
        status = model.TokenStatus.TIMED_OUT
    done = status is model.TokenStatus.COMPLETED
    return model.Token(
        id=step.token_id or "", env=run.env, secret="", status=status,
        data=step.output if done else None, tags=(), idempotency_key=None,
        created_at=step.started_at if step.started_at is not None else run.created_at,
        expires_at=step.wake_at, completed_at=step.finished_at if done else None,
        run_id=run.id, step_key=step.key)


def status_of(done: model.TokenCompletion, now: float) -> model.TokenStatus:
    """The token's status after a completion, as a caller is told it: a
    token whose run's step timed out has timed out, whatever the clock."""
    if done.step is not None and done.step.status in (model.StepStatus.TIMED_OUT,
                                                       model.StepStatus.FAILED):
        return model.TokenStatus.TIMED_OUT
    return policy.token_status(done.token, now)


def explain(done: model.TokenCompletion, now: float) -> str:
    """Why a completion changed nothing ("" when it completed)."""
    if done.completed:
        return ""
    status = status_of(done, now)
    if status is model.TokenStatus.COMPLETED:
        return "the token was already completed; nothing changed"
    if status is model.TokenStatus.TIMED_OUT:
        return "the token timed out; nothing changed"
    if done.run_status is not None and done.run_status.is_final:
        return (f"the run waiting on it is already {done.run_status.value}; "
                "nothing changed")
    return "the token could not be completed; nothing changed"
