"""Publishing a written folder: one commit of its allow-listed files (deleting the files of an older upload that
this one replaces), or the dry run's listing of that commit."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from .layout import REPLACED_PATTERNS, PushError, format_size, hub_files


def commit_operations(folder: Path, remote_files=()) -> list:
    """One ``CommitOperationAdd`` per allow-listed file, plus a ``CommitOperationDelete`` for each file of the
    existing repository that this upload replaces and does not carry any more (e.g. shards of an older split)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    files = hub_files(folder)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    stale = sorted(name for name in remote_files if name not in files
                   and any(fnmatch.fnmatchcase(name, pattern) for pattern in REPLACED_PATTERNS))
    operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
    return operations


def print_dry_run(folder: Path, files: list[str], args, description: str) -> None:
    sizes = {name: (folder / name).stat().st_size for name in files}
    print(f"\nFiles of the Hub repository ({folder}):")
    for name in files:
        print(f"  {format_size(sizes[name]):>10}  {name}")
    print(f"  {format_size(sum(sizes.values())):>10}  total, {len(files)} files")
    operations = commit_operations(folder)
    target = args.repo_id or "<--repo-id>"
    where = f"a pull request against {args.revision}" if args.create_pr else f"branch {args.revision}"
    print(f"\nDry run: would create {target} if missing ({'private' if args.private else 'default visibility'}) and "
          f"make one commit on {where} with {len(operations)} CommitOperationAdd operations "
          "(and delete files of an older upload that this one replaces)")
    print(f"  title: {args.commit_message}\n  description: {description}")
    print("Nothing was uploaded.")


def upload(folder: Path, args, description: str):
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        return _upload(folder, args, description)
    except LocalTokenNotFoundError as error:
        raise PushError(f"no Hub token: run `hf auth login` or set HF_TOKEN ({error})") from error
    except HfHubHTTPError as error:
        raise PushError(f"the Hub refused the upload to {args.repo_id}: {error}") from error


def _upload(folder: Path, args, description: str):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    api = HfApi()  # token: HF_TOKEN or the one `hf auth login` stored
    url = api.create_repo(args.repo_id, private=True if args.private else None, exist_ok=True, repo_type="model")
    print(f"Repository: {url}")
    if args.revision != "main" and not args.create_pr:
        api.create_branch(args.repo_id, branch=args.revision, exist_ok=True, repo_type="model")
    try:
        remote = api.list_repo_files(args.repo_id, revision=args.revision, repo_type="model")
    except RevisionNotFoundError:
        remote = []
    operations = commit_operations(folder, remote)
    info = api.create_commit(
        args.repo_id, operations=operations, commit_message=args.commit_message, commit_description=description,
        revision=args.revision, create_pr=args.create_pr, repo_type="model",
    )
    deleted = sum(1 for op in operations if type(op).__name__ == "CommitOperationDelete")
    print(f"Committed {len(operations) - deleted} files" + (f" and deleted {deleted} stale ones" if deleted else "")
          + f": {getattr(info, 'pr_url', None) or getattr(info, 'commit_url', info)}")
    return info

