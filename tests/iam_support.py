"""The stack's IAM policies, applied to moto and checked against the calls the code makes.

Three parts, used by tests/test_aws_e2e.py:

- `stack_template()`: the CDK stack synthesized once per test session (a subprocess, cached in a file
  the pytest-xdist workers share), and `role_statements()`: the policy statements of one of its roles.
- `RoleUsers`: an IAM user in moto per role, holding that role's statements with every CloudFormation
  token (Ref, Fn::GetAtt, Fn::Join, pseudo parameters) resolved to the moto resources' real names and
  ARNs; each process of the deployment runs with its role's access key while moto enforces IAM.
- `calls_from_log()` + `evaluate()`: the calls each process made (tests/iam_recorder.py writes them),
  as (IAM action, resource ARN), judged by a real IAM policy evaluator (@cloud-copilot/iam-simulate,
  run by node from tests/iam/) against the same statements; `unused_grants()` lists what a role is
  granted that no recorded call needed.

moto's own enforcement is basic: it matches resources on S3 and SQS only (other services ask about
"*"), names HeadObject `s3:HeadObject`, and cannot authorize presigned URLs. `moto_dialect()` adapts
the statements to the first two (documented there), `allow_presigned_requests()` adds the third; the
evaluator sees the statements exactly as synthesized.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from infra.sections import SECTIONS

REPO = Path(__file__).resolve().parents[1]
ACCOUNT = "123456789012"  # moto's default account; the stack is synthesized for it
REGION = "us-east-1"
STACK = "AceStepIam"
# A private ECR image in the account: the case where the execution role must be able to pull.
WORKER_REPOSITORY = "acestep-worker"
WORKER_IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{WORKER_REPOSITORY}:test"
# The roles whose callers the tests run or stand in for, by construct path under the stack.
API_ROLE = "ApiFunctionRole"
WORKER_ROLE = "WorkerTask/TaskRole"
EXECUTION_ROLE = "WorkerTask/ExecutionRole"
NODE_DIR = REPO / "tests" / "iam"
# What the synth reads: the cached template is rebuilt when any of these change.
_SYNTH_INPUTS = ("infra/*.py", "infra/sections/*.py", "service/aws/schema.py", "service/blob_keys.py",
                 "service/observability/metrics.py")


# -- the synthesized template ------------------------------------------------------------------

_SYNTH = """
import json, sys
import aws_cdk as cdk
from infra.acestep_stack import AceStepStack, StackOptions
# Path metadata (as the cdk CLI adds it) names each resource by its construct path.
app = cdk.App(outdir=sys.argv[1], context={{"aws:cdk:enable-path-metadata": True}})
AceStepStack(app, {stack!r}, StackOptions(lambda_asset_dir=sys.argv[2], worker_image={image!r}),
             env=cdk.Environment(account={account!r}, region={region!r}))
app.synth()
"""


def _shared_dir(basetemp: Path) -> Path:
    """A folder every pytest-xdist worker of this session sees (each has its own basetemp below it)."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def _inputs_hash() -> str:
    digest = hashlib.sha256()
    for pattern in _SYNTH_INPUTS:
        for path in sorted(REPO.glob(pattern)):
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class SynthInBackground:
    """`cdk synth` of the stack in a subprocess (about 10 s), started now and awaited by `template()`;
    reused from the session's cache when another test (or xdist worker) already made it."""

    def __init__(self, basetemp: Path):
        self.cache = _shared_dir(basetemp) / f"iam-template-{_inputs_hash()}.json"
        self._lock = open(self.cache.with_suffix(".lock"), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # held until the template is written: one synth at a time
        self._proc: Optional[subprocess.Popen] = None
        if self.cache.exists():
            self._release()
            return
        out = self.cache.with_suffix(".out")
        shutil.rmtree(out, ignore_errors=True)
        (out / "lambda").mkdir(parents=True)
        (out / "lambda" / "placeholder.txt").write_text("the API zip is not needed to read the policies\n")
        code = _SYNTH.format(stack=STACK, image=WORKER_IMAGE, account=ACCOUNT, region=REGION)
        self._out = out
        self._proc = subprocess.Popen([sys.executable, "-c", code, str(out / "cdk.out"), str(out / "lambda")],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONPATH": str(REPO)})

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def template(self, timeout: float = 300) -> dict:
        try:
            if self._proc is not None:
                output, _ = self._proc.communicate(timeout=timeout)
                assert self._proc.returncode == 0, "cdk synth failed:\n" + output.decode(errors="replace")[-4000:]
                shutil.copyfile(self._out / "cdk.out" / f"{STACK}.template.json", self.cache)
                self._proc = None
        finally:
            self._release()
        return json.loads(self.cache.read_text())

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._release()


def construct_path(resource: dict) -> str:
    """'WorkerTask/TaskRole' for a resource whose aws:cdk:path is '<stack>/Workers/WorkerTask/TaskRole/Resource':
    the path under the stack without its section (infra/sections/logical_ids.py), as its logical id is made."""
    path = resource.get("Metadata", {}).get("aws:cdk:path", "")
    parts = path.split("/")[1:]
    return "/".join(parts[1:] if parts and parts[0] in SECTIONS else parts).removesuffix("/Resource")


def logical_id(template: dict, path: str) -> str:
    found = [rid for rid, r in template["Resources"].items() if construct_path(r) == path]
    assert len(found) == 1, f"{path}: {found}"
    return found[0]


def role_statements(template: dict, role_path: str) -> list[dict]:
    """Every statement the role holds: inline policies on the role and AWS::IAM::Policy resources
    attached to it. A managed policy would be a grant nobody reviewed here, so none is allowed."""
    role_id = logical_id(template, role_path)
    role = template["Resources"][role_id]["Properties"]
    assert not role.get("ManagedPolicyArns"), f"{role_path} has managed policies: {role['ManagedPolicyArns']}"
    statements = [s for p in role.get("Policies", []) for s in p["PolicyDocument"]["Statement"]]
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role_id} in resource["Properties"].get("Roles", []):
            statements += resource["Properties"]["PolicyDocument"]["Statement"]
    assert statements, f"{role_path} holds no policy statement"
    return statements


# -- resolving CloudFormation tokens to the moto resources ----------------------------------------

@dataclass
class MotoNames:
    """The real names of the resources the stack would create, as provisioned in moto."""

    table: str
    queue_url: str
    dlq_url: str
    interactive_queue_url: str
    bucket: str
    api_key_secret_arn: str
    signing_secret_arn: str
    webhook_secret_arn: str
    cluster: str
    service: str


def queue_arn(queue_url: str) -> str:
    account, name = queue_url.rstrip("/").split("/")[-2:]
    return f"arn:aws:sqs:{REGION}:{account}:{name}"


class Resolver:
    """Ref / Fn::GetAtt / Fn::Join / Fn::Select / Fn::Split / pseudo parameters -> plain strings.

    Resources of the stack map to the moto resources by construct path; a token with no mapping
    raises KeyError (a role under test must not refer to anything the test did not provision), unless
    `placeholders` is set, when it becomes a recognisable ARN-like placeholder (for roles only AWS uses).
    """

    def __init__(self, template: dict, names: MotoNames):
        n = names
        prefix = f"arn:aws:ecs:{REGION}:{ACCOUNT}"
        self.values: dict[tuple[str, str], str] = {}
        by_path = {
            "Tasks": {"Ref": n.table, "Arn": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{n.table}"},
            "TasksQueue": {"Ref": n.queue_url, "Arn": queue_arn(n.queue_url), "QueueUrl": n.queue_url},
            "TasksDlq": {"Ref": n.dlq_url, "Arn": queue_arn(n.dlq_url), "QueueUrl": n.dlq_url},
            "InteractiveQueue": {"Ref": n.interactive_queue_url, "Arn": queue_arn(n.interactive_queue_url),
                                 "QueueUrl": n.interactive_queue_url},
            "Audio": {"Ref": n.bucket, "Arn": f"arn:aws:s3:::{n.bucket}"},
            "ApiKey": {"Ref": n.api_key_secret_arn},
            "UrlSigningSecret": {"Ref": n.signing_secret_arn},
            "WebhookSigningSecret": {"Ref": n.webhook_secret_arn},
            "Cluster": {"Ref": n.cluster, "Arn": f"{prefix}:cluster/{n.cluster}"},
            "Workers/Service": {"Ref": f"{prefix}:service/{n.cluster}/{n.service}", "Name": n.service},
        }
        for rid, resource in template["Resources"].items():
            for attribute, value in by_path.get(construct_path(resource), {}).items():
                self.values[(rid, attribute)] = value
            if resource["Type"] == "AWS::Logs::LogGroup":  # no moto counterpart: named after the logical id
                self.values[(rid, "Ref")] = rid
                self.values[(rid, "Arn")] = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{rid}:*"
        self.values.update({("AWS::Partition", "Ref"): "aws", ("AWS::Region", "Ref"): REGION,
                            ("AWS::AccountId", "Ref"): ACCOUNT, ("AWS::URLSuffix", "Ref"): "amazonaws.com"})
        self.placeholders = False

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) != 1:
            return {k: self(v) for k, v in value.items()}
        (fn, arg), = value.items()
        if fn == "Ref":
            return self._lookup(arg, "Ref")
        if fn == "Fn::GetAtt":
            return self._lookup(arg[0], arg[1])
        if fn == "Fn::Join":
            return arg[0].join(str(self(part)) for part in arg[1])
        if fn == "Fn::Select":
            return self(arg[1])[int(arg[0])]
        if fn == "Fn::Split":
            return str(self(arg[1])).split(arg[0])
        if fn.startswith("Fn::"):
            raise KeyError(f"unsupported token {fn}")
        return {fn: self(arg)}

    def _lookup(self, rid: str, attribute: str) -> str:
        try:
            return self.values[(rid, attribute)]
        except KeyError:
            if not self.placeholders:
                raise KeyError(f"{rid}.{attribute} has no moto counterpart") from None
            return f"arn:aws:placeholder:{REGION}:{ACCOUNT}:{rid}/{attribute}"

    def statements(self, statements: list[dict], placeholders: bool = False) -> list[dict]:
        self.placeholders = placeholders
        try:
            return [self(s) for s in statements]
        finally:
            self.placeholders = False


def policy(statements: list[dict]) -> dict:
    return {"Version": "2012-10-17", "Statement": statements}


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


# -- moto: one IAM user per role --------------------------------------------------------------------

# moto checks resources on these services; on the others it asks whether "*" is allowed.
_MOTO_CHECKS_RESOURCES = ("s3:", "sqs:")
# moto authorizes some operations under the operation's own name, where AWS checks another action:
# HeadObject is s3:GetObject, CopyObject s3:PutObject (on its target; and s3:GetObject on its source,
# which the recorded calls check), and a transaction needs the action of each item it holds.
_MOTO_NAMES = {"s3:GetObject": "s3:HeadObject", "s3:PutObject": "s3:CopyObject",
               "dynamodb:GetItem": "dynamodb:TransactGetItems",
               **{f"dynamodb:{a}": "dynamodb:TransactWriteItems"
                  for a in ("PutItem", "UpdateItem", "DeleteItem", "ConditionCheckItem")}}


def moto_dialect(statements: list[dict]) -> list[dict]:
    """The statements as moto can enforce them: on services where moto asks about "*" the resource is
    widened to "*" (the evaluator checks those resources), and an action AWS checks also grants moto's
    name for the operation (_MOTO_NAMES). No action is widened to a wildcard."""
    adapted = []
    for st in statements:
        actions = as_list(st["Action"])
        actions = actions + sorted({_MOTO_NAMES[a] for a in actions if a in _MOTO_NAMES} - set(actions))
        checked = [a for a in actions if a.startswith(_MOTO_CHECKS_RESOURCES)]
        unchecked = [a for a in actions if not a.startswith(_MOTO_CHECKS_RESOURCES)]
        if checked:
            adapted.append({**st, "Action": checked})
        if unchecked:
            adapted.append({**st, "Action": unchecked, "Resource": "*"})
    return adapted


@dataclass
class Identity:
    name: str
    arn: str
    access_key_id: str
    secret_access_key: str

    def env(self) -> dict[str, str]:
        """Credentials for a process of this role (no session token: a user's long-term key)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}


def create_user(iam, name: str, statements: list[dict]) -> Identity:
    user = iam.create_user(UserName=name)["User"]
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy(statements)))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return Identity(name, user["Arn"], key["AccessKeyId"], key["SecretAccessKey"])


@contextlib.contextmanager
def iam_enforced() -> Iterator[None]:
    """moto (in this process, which runs its server) checks every request's signature and policies."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
    try:
        with allow_presigned_requests():
            yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before


@contextlib.contextmanager
def allow_presigned_requests() -> Iterator[None]:
    """moto authorizes only requests with an Authorization header (a presigned URL makes it fail with
    a KeyError). For a query-string-signed request, apply the signer's policies to the action and
    resource as for any other request; moto already checks the presigned signature's headers."""
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam.access_control import IAMPolicy, PermissionResult, create_access_key
    from moto.s3.exceptions import S3AccessDeniedError

    original = ActionAuthenticatorMixin._authenticate_and_authorize_s3_action

    def authorize(self, bucket_name=None, key_name=None):
        credential = (self.querystring.get("X-Amz-Credential") or [""])[0] if hasattr(self, "querystring") else ""
        if "Authorization" in self.headers or not credential:
            return original(self, bucket_name=bucket_name, key_name=key_name)
        resource = f"arn:aws:s3:::{bucket_name or '*'}" + (f"/{key_name}" if key_name else "")
        action = f"s3:{self._get_action()}"
        signer = create_access_key(account_id=self.current_account, partition="aws",
                                   access_key_id=credential.split("/")[0], headers={})
        results = [IAMPolicy(p).is_action_permitted(action, resource) for p in signer.collect_policies()]
        if PermissionResult.DENIED in results or PermissionResult.PERMITTED not in results:
            raise S3AccessDeniedError()

    ActionAuthenticatorMixin._authenticate_and_authorize_s3_action = authorize
    try:
        yield
    finally:
        ActionAuthenticatorMixin._authenticate_and_authorize_s3_action = original


# -- the calls the code made, as IAM sees them -----------------------------------------------------

@dataclass(frozen=True)
class Call:
    action: str
    resource: str
    source: str  # where it was seen (operation, or the allow-list's reason)


_S3_OBJECT_ACTIONS = {"HeadObject": "GetObject", "CreateMultipartUpload": "PutObject", "UploadPart": "PutObject",
                      "CompleteMultipartUpload": "PutObject", "CopyObject": "PutObject"}
_S3_BUCKET_ACTIONS = {"ListObjectsV2": "ListBucket", "ListObjects": "ListBucket", "HeadBucket": "ListBucket"}
_TRANSACT_ACTIONS = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                     "ConditionCheck": "ConditionCheckItem", "Get": "GetItem"}


def iam_calls(record: dict) -> list[Call]:
    """One recorded SDK operation (tests/iam_recorder.py) -> the (IAM action, resource ARN) it needs."""
    service, op, p = record["service"], record["operation"], record["params"]
    source = f"{service}.{op}" + (" (presigned)" if record.get("presigned") else "")
    if service == "s3":
        if op in _S3_BUCKET_ACTIONS:
            return [Call(f"s3:{_S3_BUCKET_ACTIONS[op]}", f"arn:aws:s3:::{p['Bucket']}", source)]
        key = f"arn:aws:s3:::{p['Bucket']}/{p['Key']}" if "Key" in p else f"arn:aws:s3:::{p['Bucket']}"
        return [Call(f"s3:{_S3_OBJECT_ACTIONS.get(op, op)}", key, source)]
    if service == "dynamodb":
        table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/"
        if op in ("TransactWriteItems", "TransactGetItems"):
            return [Call(f"dynamodb:{_TRANSACT_ACTIONS[kind]}", table + name, source) for kind, name in p["Items"]]
        if op in ("BatchGetItem", "BatchWriteItem"):
            return [Call(f"dynamodb:{op}", table + name, source) for name in p["Tables"]]
        arn = table + p["TableName"] + (f"/index/{p['IndexName']}" if p.get("IndexName") else "")
        return [Call(f"dynamodb:{op}", arn, source)]
    if service == "sqs":
        return [Call(f"sqs:{op}", queue_arn(p["QueueUrl"]), source)]
    if service == "secretsmanager":
        secret = p["SecretId"]
        arn = secret if secret.startswith("arn:") else f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{secret}"
        return [Call(f"secretsmanager:{op}", arn, source)]
    if service == "ssm":
        return [Call(f"ssm:{op}", f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/{p['Name'].lstrip('/')}", source)]
    if service == "ecs":
        prefix = f"arn:aws:ecs:{REGION}:{ACCOUNT}"
        cluster = p["cluster"].rsplit("/", 1)[-1]
        if op in ("UpdateTaskProtection", "GetTaskProtection"):  # the ECS agent's (tests/ecs_agent_support.py)
            return [Call(f"ecs:{op}", f"{prefix}:task/{cluster}/{t.rsplit('/', 1)[-1]}", source) for t in p["tasks"]]
        services = p.get("services") or [p["service"]]
        return [Call(f"ecs:{op}", f"{prefix}:service/{cluster}/{s.rsplit('/', 1)[-1]}", source) for s in services]
    raise AssertionError(f"no IAM mapping for {service}.{op}: add one to tests/iam_support.py")


def calls_from_log(path: Path) -> list[Call]:
    if not path.exists():
        return []
    calls: set[Call] = set()
    for line in path.read_text().splitlines():
        calls.update(iam_calls(json.loads(line)))
    return sorted(calls, key=lambda c: (c.action, c.resource, c.source))


# -- judging them ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _npm_lock() -> Iterator[None]:
    import tempfile

    # outside the tree (npm ci empties node_modules): xdist workers install one at a time
    with open(Path(tempfile.gettempdir()) / "acestep-iam-npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_evaluator() -> Optional[str]:
    """Install the evaluator (npm ci from tests/iam/package-lock.json, once per lock file); returns why
    it cannot run, or None."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm are not installed: the IAM policy evaluator (@cloud-copilot/iam-simulate) needs them"
    stamp = NODE_DIR / "node_modules" / ".stamp"
    wanted = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    with _npm_lock():
        if not (stamp.exists() and stamp.read_text() == wanted):
            out = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, f"npm ci in {NODE_DIR} failed:\n{out.stdout}\n{out.stderr}"
            stamp.write_text(wanted)
    return None


def evaluate(calls: Iterable[Call], principal: str, statements: list[dict]) -> list[tuple[Call, str]]:
    """Each call that the statements do not allow, with the evaluator's verdict."""
    calls = list(calls)
    if not calls:
        return []
    cases = [{"principal": principal, "action": c.action, "resource": c.resource, "account": ACCOUNT,
              "policies": [{"name": "role", "policy": policy(statements)}]} for c in calls]
    out = subprocess.run(["node", "evaluate.mjs"], cwd=NODE_DIR, input=json.dumps({"cases": cases}),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    return [(c, a["result"] + (f" {a['detail']}" if "detail" in a else ""))
            for c, a in zip(calls, answers) if a["result"] != "Allowed"]


def _matches(pattern: str, value: str, *, action: bool) -> bool:
    if action:
        return fnmatchcase(value.lower(), pattern.lower())
    return fnmatchcase(value, pattern)


def unused_grants(statements: list[dict], calls: Iterable[Call]) -> list[str]:
    """Each (action, resource) a statement allows that no call needed; wildcard actions and a bare "*"
    resource are reported unless a call needed exactly that (e.g. ecr:GetAuthorizationToken)."""
    calls = list(calls)
    unused = []
    for st in statements:
        assert st.get("Effect") == "Allow" and "Condition" not in st and "NotAction" not in st, st
        for action in as_list(st["Action"]):
            for resource in as_list(st["Resource"]):
                used = [c for c in calls if _matches(action, c.action, action=True)
                        and _matches(resource, c.resource, action=False)]
                if "*" in action and {c.action for c in used} != {action}:
                    unused.append(f"{action} on {resource}: a wildcard action (used as {sorted({c.action for c in used})})")
                elif not used:
                    unused.append(f"{action} on {resource} (statement {st.get('Sid', '?')})")
    return unused


_ARN = re.compile(r"^(\*|arn:aws:[a-z0-9-]+:[a-z0-9-]*:\d*:.+)$")


def check_arns(calls: Iterable[Call]) -> list[Call]:
    """Calls whose resource is not a well-formed ARN (a mapping bug in iam_calls would hide there)."""
    return [c for c in calls if not _ARN.match(c.resource)]


# -- the deployment's identities and environments ------------------------------------------------

def _function_env(template: dict, path: str) -> dict:
    props = template["Resources"][logical_id(template, path)]["Properties"]
    return props["Environment"]["Variables"]


def _container_env(template: dict, path: str) -> dict:
    (container,) = template["Resources"][logical_id(template, path)]["Properties"]["ContainerDefinitions"]
    return {e["Name"]: e["Value"] for e in container.get("Environment", [])}


class StackAccess:
    """The stack's roles as moto users (created while moto does not yet enforce IAM), the environment
    the stack gives each process (tokens resolved to the moto resources), and an admin user for the
    test's own view of the resources (what an operator with full rights sees)."""

    def __init__(self, template: dict, names: MotoNames, iam):
        self.template, self.names = template, names
        self.resolve = Resolver(template, names)
        self.users = {role: create_user(iam, role.replace("/", "-"), moto_dialect(self.statements(role)))
                      for role in (API_ROLE, WORKER_ROLE)}
        self.admin = create_user(iam, "operator", [{"Effect": "Allow", "Action": "*", "Resource": "*"}])

    def statements(self, role: str) -> list[dict]:
        """The role's statements as synthesized, tokens resolved (unknown ones are an error)."""
        return self.resolve.statements(role_statements(self.template, role), placeholders=role == EXECUTION_ROLE)

    def api_env(self) -> dict[str, str]:
        """The API Lambda's environment from the template, with the API role's credentials."""
        env = self.resolve.statements([_function_env(self.template, "ApiFunction")])[0]
        return {**env, **self.users[API_ROLE].env()}

    def worker_env(self) -> dict[str, str]:
        """The worker container's environment from the template (ACESTEP_PUBLIC_BASE_URL, the HTTP API's
        address, has no moto counterpart: the caller sets it), with the worker role's credentials."""
        raw = dict(_container_env(self.template, "WorkerTask"))
        raw.pop("ACESTEP_PUBLIC_BASE_URL")
        env = self.resolve.statements([raw])[0]
        return {**env, **self.users[WORKER_ROLE].env()}

    def role_arn(self, role: str) -> str:
        return f"arn:aws:iam::{ACCOUNT}:role/{role.replace('/', '-')}"


# -- calls no test can record ---------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    """A call a role must be allowed to make although the e2e does not record it, and why."""

    role: str
    action: str
    resource: str  # an ARN, "*", or "<construct path>[.<attribute>]<suffix>" of a stack resource
    why: str


_LAMBDA_LOGS = "The Lambda service writes the function's logs with its role; tests run the app, not Lambda."
_AGENT_PULLS = ("The ECS agent pulls the worker image (a private ECR repository, worker_image=...) with the "
                "task execution role; no test runs an ECS agent.")
_AGENT_LOGS = "The ECS agent's awslogs driver ships the container's output with the task execution role."
_REPOSITORY = f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/{WORKER_REPOSITORY}"

EXPECTED = [
    Expected(API_ROLE, "logs:CreateLogStream", "ApiLogs:log-stream:s", _LAMBDA_LOGS),
    Expected(API_ROLE, "logs:PutLogEvents", "ApiLogs:log-stream:s", _LAMBDA_LOGS),
    Expected(API_ROLE, "dynamodb:DeleteItem", "Tasks", "DynamoTaskStore.find_by_idempotency_key drops the "
             "mapping of an idempotency key whose task has expired (TTL: days); test_aws_store.py runs it (no roles)."),
    Expected(API_ROLE, "s3:DeleteObject", "Audio/uploads/t/src.wav", "submit_task deletes the files of a multipart "
             "submit that was refused or lost a concurrent retry's race (tests/test_ports_contract.py, no roles)."),
    Expected(EXECUTION_ROLE, "ecr:GetAuthorizationToken", "*", _AGENT_PULLS + " The token call takes no resource."),
    Expected(EXECUTION_ROLE, "ecr:BatchCheckLayerAvailability", _REPOSITORY, _AGENT_PULLS),
    Expected(EXECUTION_ROLE, "ecr:GetDownloadUrlForLayer", _REPOSITORY, _AGENT_PULLS),
    Expected(EXECUTION_ROLE, "ecr:BatchGetImage", _REPOSITORY, _AGENT_PULLS),
    Expected(EXECUTION_ROLE, "logs:CreateLogStream", "WorkerLogs:log-stream:s", _AGENT_LOGS),
    Expected(EXECUTION_ROLE, "logs:PutLogEvents", "WorkerLogs:log-stream:s", _AGENT_LOGS),
    Expected(WORKER_ROLE, "sqs:SendMessage", "TasksQueue", "SqsTaskQueue.release: a worker stopped by SIGTERM "
             "(scale-in, spot) gives its task back by sending it again; and requeue, for a dead letter that never "
             "ran. tests/test_give_back.py and tests/test_aws_queue.py run them (no roles); the e2e kills with SIGKILL."),
    Expected(WORKER_ROLE, "sqs:SendMessage", "TasksDlq", "SqsTaskQueue._dead_letter: a task given back (its lost "
             "deliveries carried in the message body) past max_receives is dead-lettered by the worker itself, as "
             "SQS's redrive cannot count those. tests/test_aws_queue.py runs it (no roles)."),
    # The interactive lane (/format_input's LM-only tasks): the e2e's workers read it (recorded) but it sends no
    # format task; tests/test_interactive_lane.py runs these calls on moto (no roles).
    Expected(API_ROLE, "sqs:SendMessage", "InteractiveQueue", "AwsTaskIntake.submit sends an LM-only task "
             "(/format_input) to the interactive lane's queue."),
    Expected(WORKER_ROLE, "sqs:DeleteMessage", "InteractiveQueue", "SqsTaskQueue.ack of an interactive task's lease."),
    Expected(WORKER_ROLE, "sqs:ChangeMessageVisibility", "InteractiveQueue", "SqsTaskQueue.extend (the lease "
             "keeper) of an interactive task's lease, and the check before its give-back."),
    Expected(WORKER_ROLE, "sqs:SendMessage", "InteractiveQueue", "SqsTaskQueue.release gives an interactive task "
             "back to its own lane; requeue and the ghost reconciler send a never-run one there."),
    Expected(WORKER_ROLE, "s3:DeleteObject", "Audio/outputs/t/2-0.wav", "A fenced-out duplicate attempt removes "
             "the files it wrote (service/worker.py); the e2e's duplicate delivery is refused before it generates."),
    Expected(WORKER_ROLE, "s3:GetObject", "Audio/outputs/t/generation_info.json", "A webhook's payload reads back "
             "the result parts spilled out of a large task item (service/aws/result_spill.py); the e2e sends no webhook."),
    Expected(WORKER_ROLE, "secretsmanager:GetSecretValue", "WebhookSigningSecret.Ref", "Workers sign webhook "
             "deliveries with the stack's webhook secret (tests/test_webhooks.py); the e2e sends no webhook."),
    # Adapters (issue 24): the e2e uploads none; tests/test_api_adapters.py and tests/test_adapters.py run these
    # code paths on moto without roles.
    Expected(API_ROLE, "s3:PutObject", "Audio/adapters/a.safetensors", "POST /v1/adapters keeps a checked upload "
             "under adapters/<sha256> (handlers/routes_adapters.py)."),
    Expected(API_ROLE, "s3:GetObject", "Audio/adapters/a.safetensors", "POST /v1/adapters reads an adapter PUT "
             "to its presigned key back to check its header before keeping it (handlers/routes_adapters.py)."),
    Expected(API_ROLE, "s3:DeleteObject", "Audio/adapters/a.safetensors", "DELETE /v1/adapters/{name} removes "
             "the stored bytes once no other name refers to their sha256 (service/adapter_removal.py)."),
    Expected(WORKER_ROLE, "s3:GetObject", "Audio/adapters/a.safetensors", "A worker fetches an uploaded adapter "
             "by its sha256 key before the batch that names it (service/adapter_fetch.py)."),
]

_SPEC = re.compile(r"^(?P<path>[A-Za-z0-9]+)(?:\.(?P<attribute>[A-Za-z]+))?(?P<suffix>[:/].*)?$")


def expected_calls(access: StackAccess, role: str) -> list[Call]:
    calls = []
    for e in (e for e in EXPECTED if e.role == role):
        if e.resource.startswith("arn:") or e.resource == "*":
            arn = e.resource
        else:
            spec = _SPEC.match(e.resource)
            assert spec, e.resource
            path, suffix = spec["path"], spec["suffix"] or ""
            arn = access.resolve.values[(logical_id(access.template, path), spec["attribute"] or "Arn")]
            arn = arn.removesuffix(":*") + suffix  # a log group's ARN ends in ":*"
        calls.append(Call(e.action, arn, f"expected: {e.why}"))
    return calls


def judge(access: StackAccess, role: str, recorded: list[Call]) -> tuple[list[tuple[Call, str]], list[str]]:
    """(calls the role's statements do not allow, grants no call needed) for the recorded calls plus
    the role's EXPECTED ones, evaluated against the statements exactly as synthesized."""
    statements = access.statements(role)
    calls = recorded + expected_calls(access, role)
    return evaluate(calls, access.role_arn(role), statements), unused_grants(statements, calls)
