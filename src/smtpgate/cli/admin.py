"""``smtpgate config …``, ``profile``, ``connector``, ``certificate``, ``listener``,
``domain`` and ``admin token``: the configuration lifecycle from the shell.

Each command works on the local store (``--config FILE`` names the file whose
``gateway.data_dir`` holds it, or ``--data-dir DIR``) or on a running gateway
(``--api URL`` with ``--token`` or ``SMTPGATE_TOKEN``). Edits change only the
draft; ``smtpgate config apply`` makes them current. Output is a table or a
sentence for people, JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtpgate.admin import edit
from smtpgate.cli import args as arg_types
from smtpgate.errors import AdminError

if TYPE_CHECKING:  # the store and the HTTP client load only for the commands that use them
    from smtpgate.cli.backend import ApiBackend, Backend
    from smtpgate.config.document import Document
    from smtpgate.config.store import ConfigStore

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

OBJECTS = {
    "profile": "connection_profiles",
    "connector": "send_connectors",
    "certificate": "certificates",
    "listener": "listeners",
}
LIFECYCLE = {
    "show": "print the draft (or applied, or an old revision) as YAML",
    "diff": "the changes the draft makes to the applied revision",
    "validate": "run every check on the draft",
    "apply": "make the draft the running configuration",
    "discard": "drop the draft",
    "history": "the applied revisions, newest first",
    "audit": "who changed what, newest first",
    "rollback": "stage an old revision as the draft",
    "import": "stage a YAML file as the draft",
    "export": "print the applied revision (or the draft) as YAML",
    "set": "edit a settings section of the draft: tls opportunistic=false",
}


def where_options(parser: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    """``--config`` | ``--data-dir`` | ``--api URL`` (with ``--token``), and ``--json``;
    none of them: the default configuration file (``arg_types.default_config``)."""
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--config",
        type=Path,
        help="the configuration file (locates the store); default $SMTPGATE_CONFIG, "
        "else /etc/smtpgate/gateway.yaml",
    )
    target.add_argument(
        "--data-dir", type=arg_types.data_dir, help="an existing gateway's data directory"
    )
    target.add_argument(
        "--api",
        type=arg_types.api_url,
        metavar="URL",
        help="a running gateway's API, e.g. http://127.0.0.1:8025",
    )
    parser.add_argument("--token", help="API token (default: $SMTPGATE_TOKEN)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_config_commands(config_commands: Commands) -> None:
    parsers = {
        name: config_commands.add_parser(name, help=text) for name, text in LIFECYCLE.items()
    }
    show = parsers["show"].add_mutually_exclusive_group()
    show.add_argument("--applied", action="store_true")
    show.add_argument("--revision", type=int)
    parsers["apply"].add_argument("--comment", default="", help="recorded in the history")
    parsers["apply"].add_argument(
        "--force", action="store_true", help="apply a draft staged on an older revision"
    )
    parsers["apply"].add_argument(
        "--wait",
        type=float,
        default=10,
        metavar="SECONDS",
        help="how long to wait for every running gateway to enforce it (default 10)",
    )
    parsers["apply"].add_argument(
        "--no-wait", dest="wait", action="store_const", const=0.0, help="do not wait"
    )
    parsers["rollback"].add_argument("revision", type=int)
    parsers["import"].add_argument("file", type=Path)
    for name in ("rollback", "import"):
        parsers[name].add_argument("--force", action="store_true", help="replace a staged draft")
    parsers["export"].add_argument("--draft", action="store_true")
    parsers["export"].add_argument("--redact", action="store_true", help="hide encrypted secrets")
    parsers["set"].add_argument("section", choices=[*edit.SECTIONS, "spoof_detection"])
    parsers["set"].add_argument("edits", nargs="+", metavar="FIELD=VALUE")
    for parser in parsers.values():
        where_options(parser)


def add_object_commands(commands: Commands) -> None:
    for command, collection in OBJECTS.items():
        label = edit.COLLECTIONS[collection]
        parser = commands.add_parser(command, help=f"{label}s in the draft")
        actions = parser.add_subparsers(dest="object_command", required=True)
        listing = actions.add_parser("list", help=f"the {label}s")
        show = actions.add_parser("show", help=f"one {label}")
        add = actions.add_parser("add", help=f"add a {label}: NAME FIELD=VALUE ...")
        change = actions.add_parser("set", help="change fields: NAME FIELD=VALUE FIELD+=ITEM ...")
        delete = actions.add_parser("delete", help=f"delete a {label}")
        for sub in (show, add, change, delete):
            sub.add_argument("name")
        for sub in (add, change):
            sub.add_argument("edits", nargs="*" if sub is add else "+", metavar="FIELD=VALUE")
        for sub in (listing, show, add, change, delete):
            where_options(sub)
    domain = commands.add_parser("domain", help="hosted domains in the draft")
    domain_actions = domain.add_subparsers(dest="object_command", required=True)
    where_options(domain_actions.add_parser("list", help="the hosted domains"))
    for name in ("add", "delete"):
        sub = domain_actions.add_parser(name, help=f"{name} a hosted domain")
        sub.add_argument("name", metavar="DOMAIN")
        where_options(sub)


def add_admin_commands(commands: Commands) -> None:
    admin = commands.add_parser("admin", help="API tokens, the API server")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    api = admin_commands.add_parser(
        "api", help="run the REST API alone (smtpgate serve starts it for admin.listen)"
    )
    api.add_argument("--data-dir", type=arg_types.data_dir, required=True)
    api.add_argument("--listen", type=arg_types.listen_address, required=True, metavar="HOST:PORT")
    api.add_argument("--fd", type=int, help="a listening socket to serve on (from smtpgate serve)")
    api.add_argument("--certificate", metavar="NAME", help="serve HTTPS with this certificate")
    api.add_argument(
        "--run-as", metavar="UID:GID", help="become this user first (smtpgate serve's gateway.user)"
    )
    api.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    api.add_argument("--log-json", action="store_true")
    token = admin_commands.add_parser("token", help="API tokens (kept hashed in the store)")
    actions = token.add_subparsers(dest="token_command", required=True)
    create = actions.add_parser("create", help="make a token; it is printed once")
    revoke = actions.add_parser("revoke", help="revoke a token")
    listing = actions.add_parser("list", help="the tokens (names only)")
    for sub in (create, revoke):
        sub.add_argument("name")
    users = _add_user_commands(admin_commands)
    for sub in (create, revoke, listing, *users):
        target = sub.add_mutually_exclusive_group()
        target.add_argument("--config", type=Path)
        target.add_argument("--data-dir", type=arg_types.data_dir)


def _add_user_commands(admin_commands: Commands) -> list[argparse.ArgumentParser]:
    """The ``user`` commands; returns those that take ``--config``/``--data-dir``."""
    user = admin_commands.add_parser("user", help="console accounts (passwords kept as argon2id)")
    actions = user.add_subparsers(dest="user_command", required=True)
    create = actions.add_parser("create", help="a new console user")
    passwd = actions.add_parser("passwd", help="set a user's password")
    delete = actions.add_parser("delete", help="remove a user")
    listing = actions.add_parser("list", help="the users and their roles")
    for sub in (create, passwd, delete):
        sub.add_argument("name")
    create.add_argument("--role", choices=["admin", "auditor"], default="admin")
    for sub in (create, passwd):
        sub.add_argument(
            "--password-stdin", action="store_true", help="read the password from standard input"
        )
    return [create, passwd, delete, listing]


# -- running them ------------------------------------------------------------------


def data_dir_of(args: argparse.Namespace) -> Path:
    if getattr(args, "data_dir", None) is not None:
        return Path(args.data_dir)
    return arg_types.load_file(args.config).gateway.data_dir


def store_of(args: argparse.Namespace) -> ConfigStore:
    """The store of ``--data-dir`` (where ``serve`` noted it), or of ``--config``'s
    gateway (its ``gateway.store`` until the first ``serve``)."""
    from smtpgate.config.store import ConfigStore  # noqa: PLC0415

    if getattr(args, "data_dir", None) is not None:
        return existing_store(Path(args.data_dir))
    return ConfigStore.open_for(arg_types.load_file(args.config).gateway)


def existing_store(data_dir: Path) -> ConfigStore:
    """The store ``serve`` made or noted in ``data_dir`` (``--data-dir``); never a
    new empty one (a data directory with a queue and no store: AdminError)."""
    from smtpgate.config.store import ConfigStore, store_exists  # noqa: PLC0415

    if not store_exists(data_dir):
        raise AdminError(
            f"{data_dir} has no configuration store (no config.db, no note of another): "
            "use --config, or run `smtpgate serve` once"
        )
    return ConfigStore.open(data_dir)


def api_for(args: argparse.Namespace) -> ApiBackend:
    from smtpgate.cli.backend import ApiBackend  # noqa: PLC0415

    token = args.token or os.environ.get("SMTPGATE_TOKEN", "")
    if not token:
        raise AdminError("--api needs a token: --token or SMTPGATE_TOKEN")
    return ApiBackend(args.api, token)


def backend_for(args: argparse.Namespace) -> Backend:
    from smtpgate.admin.services import ConfigService  # noqa: PLC0415
    from smtpgate.cli.backend import LocalBackend, local_actor  # noqa: PLC0415

    if args.api:
        return api_for(args)
    service = ConfigService(store_of(args), data_dir_of(args), local_of(args))
    return LocalBackend(service, local_actor())


def local_of(args: argparse.Namespace) -> Document:
    """This node's local settings: those of ``--config``'s file, or (``--data-dir``)
    those ``serve`` noted in the data directory (an empty result means the latter).
    Before the first ``serve``, the file's are noted there, for the API and
    ``--data-dir``."""
    from smtpgate.admin import nodes  # noqa: PLC0415
    from smtpgate.config.document import local_part, to_document  # noqa: PLC0415

    if getattr(args, "data_dir", None) is not None or not getattr(args, "config", None):
        return {}
    config = arg_types.load_file(args.config)
    local = local_part(to_document(config))
    if not nodes.has_local(config.gateway.data_dir):
        nodes.remember_local(config.gateway.data_dir, local)
    return local


def run_config(args: argparse.Namespace) -> int:
    backend = backend_for(args)
    try:
        return _lifecycle(backend, args)
    finally:
        backend.close()


def _lifecycle(backend: Backend, args: argparse.Namespace) -> int:  # noqa: PLR0912
    action = args.config_command
    if action == "show":
        which = "applied" if args.applied else str(args.revision) if args.revision else "draft"
        document = backend.view(which)
        print(json.dumps(document, indent=1) if args.json else _yaml(document))
    elif action == "diff":
        result = backend.diff()
        print(json.dumps(result, indent=1) if args.json else _diff_text(result))
    elif action == "validate":
        problems = backend.validate()
        if args.json:
            print(json.dumps({"valid": not problems, "problems": problems}, indent=1))
        for problem in [] if args.json else problems:
            print(f"  - {problem['path']}: {problem['message']}")
        if not args.json:
            print("the draft is invalid" if problems else "the draft is valid")
        return 1 if problems else 0
    elif action == "apply":
        result = backend.apply(args.comment, args.force, args.wait)
        print(json.dumps(result, indent=1) if args.json else _applied_text(result))
        return 0 if result.get("complete", True) else 1
    elif action == "discard":
        backend.discard()
        print("draft discarded")
    elif action in ("history", "audit"):
        rows = backend.history() if action == "history" else backend.audit()
        print(json.dumps(rows, indent=1) if args.json else _rows_text(rows))
    elif action == "rollback":
        backend.rollback(args.revision, args.force)
        print(f"revision {args.revision} staged as the draft; `smtpgate config apply` to use it")
    elif action == "import":
        backend.import_document(arg_types.read_file(args.file), args.force)
        print(f"{args.file} staged as the draft; review it with `smtpgate config diff`")
    elif action == "export":
        print(backend.export("draft" if args.draft else "applied", args.redact), end="")
    elif action == "set":
        return _set_section(backend, args)
    return 0


def _set_section(backend: Backend, args: argparse.Namespace) -> int:
    document, version = backend.working()
    section = args.section
    if section == "spoof_detection":
        value = edit.apply_edits({}, [f"value={args.edits[0]}"])["value"]
        document = {**document, section: value}
    else:
        document = {**document, section: edit.apply_edits(document[section], args.edits)}
    backend.put_draft(document, version, f"{section} settings")
    print(f"draft: {section} changed; `smtpgate config diff` shows the draft")
    return 0


def run_object(args: argparse.Namespace) -> int:
    backend = backend_for(args)
    try:
        if args.command == "domain":
            return _domain(backend, args)
        return _object(backend, args, OBJECTS[args.command])
    finally:
        backend.close()


def _object(backend: Backend, args: argparse.Namespace, collection: str) -> int:
    document, version = backend.working()
    label = edit.COLLECTIONS[collection]
    action = args.object_command
    if action == "list":
        found = edit.items(document, collection)
        print(json.dumps(found, indent=1) if args.json else _object_table(collection, found))
        return 0
    if action == "show":
        item = edit.get_item(document, collection, args.name)
        print(json.dumps(item, indent=1) if args.json else _yaml(item))
        return 0
    if action == "add":
        item = edit.apply_edits({"name": args.name}, args.edits)
        document = edit.add_item(document, collection, item)
    elif action == "set":
        item = edit.apply_edits(edit.get_item(document, collection, args.name), args.edits)
        document = edit.replace_item(document, collection, args.name, item)
    else:
        document = edit.delete_item(document, collection, args.name)
    backend.put_draft(document, version, f"{action} {label} {args.name}")
    print(f"draft: {label} {args.name} {_done(action)}; `smtpgate config apply` to use it")
    return 0


def _done(action: str) -> str:
    return {"add": "added", "set": "changed", "delete": "deleted"}[action]


def _domain(backend: Backend, args: argparse.Namespace) -> int:
    document, version = backend.working()
    domains: list[str] = document["hosted_domains"]
    if args.object_command == "list":
        print(json.dumps(domains) if args.json else "\n".join(domains) or "(none)")
        return 0
    name = args.name.lower()
    if args.object_command == "add":
        if name in domains:
            raise AdminError(f"{name} is a hosted domain already")
        kept = [*domains, name]
    else:
        if name not in domains:
            raise AdminError(f"{name} is not a hosted domain")
        kept = [d for d in domains if d != name]
    backend.put_draft({**document, "hosted_domains": kept}, version, f"hosted domain {name}")
    print(f"draft: hosted domain {name} {_done(args.object_command)}")
    return 0


def run_admin(args: argparse.Namespace) -> int:
    if args.admin_command == "api":
        from smtpgate.admin.api import run_api  # noqa: PLC0415
        from smtpgate.observe.log import configure  # noqa: PLC0415

        if args.run_as:  # before anything is opened
            from smtpgate.privileges import Drop  # noqa: PLC0415

            uid, _, gid = args.run_as.partition(":")
            Drop(f"uid {uid}", int(uid), int(gid)).now()
        configure(args.log_level, json=args.log_json)
        run_api(args.data_dir, args.listen, args.fd, args.certificate)
        return 0
    if args.admin_command == "user":
        return _run_user(args)
    from smtpgate.admin.services import create_token, revoke_token  # noqa: PLC0415
    from smtpgate.cli.backend import local_actor  # noqa: PLC0415

    store = store_of(args)
    try:
        if args.token_command == "create":  # noqa: S105 - a subcommand name
            token = create_token(store, args.name, local_actor())
            print(token)
            print("keep it now: only its hash is stored", file=sys.stderr)
        elif args.token_command == "revoke":  # noqa: S105
            revoke_token(store, args.name, local_actor())
            print(f"token {args.name} revoked")
        else:
            for name, created, by in store.token_list():
                print(f"{name}\tcreated {_when(created)} by {by}")
    finally:
        store.close()
    return 0


def _run_user(args: argparse.Namespace) -> int:
    from smtpgate.admin import accounts  # noqa: PLC0415
    from smtpgate.cli.backend import local_actor  # noqa: PLC0415

    action = args.user_command
    password = _new_password(args) if action in ("create", "passwd") else ""
    store = store_of(args)
    try:
        if action == "create":
            accounts.create_user(store, args.name, password, args.role, local_actor())
            print(f"user {args.name} created ({args.role})")
        elif action == "passwd":
            accounts.set_password(store, args.name, password, local_actor())
            print(f"password of {args.name} changed")
        elif action == "delete":
            accounts.delete_user(store, args.name, local_actor())
            print(f"user {args.name} deleted")
        else:
            for found in accounts.list_users(store):
                created = _when(float(found["created_at"]))
                print(
                    f"{found['name']}\t{found['role']}\tcreated {created} by {found['created_by']}"
                )
    finally:
        store.close()
    return 0


def _new_password(args: argparse.Namespace) -> str:
    """From standard input (one line), or asked twice on the terminal."""
    import getpass  # noqa: PLC0415

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise AdminError("the two passwords differ")
    return first


# -- text output -----------------------------------------------------------------------


def _yaml(document: Any) -> str:
    import yaml  # noqa: PLC0415

    return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True)).rstrip()


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))


def _diff_text(result: dict[str, Any]) -> str:
    changes = result["changes"]
    if not changes:
        return "no changes (the draft is the applied revision, or there is no draft)"
    lines = [change["text"] for change in changes]
    if result["restart_required"]:
        lines.append("restart required for: " + ", ".join(result["restart_required"]))
    return "\n".join(lines)


def _applied_text(result: dict[str, Any]) -> str:
    lines = [f"applied as revision {result['revision']}"]
    lines += [f"  {change['text']}" for change in result["changes"]]
    if result["restart_required"]:
        lines.append(
            "restart required (the running gateway keeps the old values until then): "
            + ", ".join(result["restart_required"])
        )
    if "nodes" in result:
        lines += _nodes_text(result["nodes"])
    return "\n".join(lines)


def _nodes_text(found: list[dict[str, str]]) -> list[str]:
    """One line per gateway: in force there, refused, or not answering."""
    if not found:
        return ["no gateway is running on this store: it takes effect when one starts"]
    return [
        f"{n['node']}: {n['state']}" + (f" ({n['detail']})" if n["detail"] else "") for n in found
    ]


def _rows_text(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        stamp = _when(row.get("applied_at") or row.get("at") or 0)
        who = row.get("applied_by") or row.get("actor")
        what = row.get("revision") or row.get("action")
        extra = row.get("comment") or row.get("detail") or ""
        lines.append(f"{what!s:<18} {stamp}  {who}  {extra}".rstrip())
    return "\n".join(lines) or "(nothing yet)"


def _object_table(collection: str, found: list[dict[str, Any]]) -> str:
    columns = {
        "connection_profiles": ("relay", "client_hosts"),
        "send_connectors": ("cost", "security"),
        "certificates": ("cert", "pkcs12"),
        "listeners": ("address", "security"),
    }[collection]
    lines = []
    for item in found:
        shown = [_cell(item.get(column)) for column in columns]
        lines.append(f"{item['name']:<20} " + "  ".join(f"{c:<22}" for c in shown).rstrip())
    return "\n".join(lines) or "(none)"


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value)
