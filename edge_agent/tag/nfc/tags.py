"""Tag operations in nfcpy's thread: NDEF read, tear-safe write-back, presence, passwords.

Every use of nfcpy's private members (its NDEF memory image, NTAG configuration page, Type 4 file
commands) is in this module, so an nfcpy upgrade is checked in one place.

Write-back on Type 2 tags (NTAG21x, Ultralight): when the new message has the length of the one
on the tag, only the 4-byte pages that differ are written, and the NDEF TLV length is never touched
(nfcpy's own NDEF write zeroes it first, which a tear would leave as an empty tag). The pages
written are read back and compared. Type 3 (FeliCa) tags likewise get only the 16-byte blocks that
differ, with the attribute block left alone, and Type 4 tags an UPDATE BINARY per run of differing
bytes, with NLEN left alone. Other writes go through nfcpy's NDEF write and a full read-back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ...errors import TagIOError
from ...messages import uid_hex


def sense(clf: Any, targets: Sequence[str], pause: Callable[[], bool]) -> Any:
    """Sense until a tag is activated and return it; between tries ``pause()`` waits and returns
    True to give up (then None)."""
    import nfc.clf
    import nfc.tag

    remote = [nfc.clf.RemoteTarget(brty) for brty in targets]
    while True:
        target = clf.sense(*remote, iterations=1)
        tag = nfc.tag.activate(clf, target) if target is not None else None
        if tag is not None:
            return tag
        if pause():
            return None


def fresh_ndef(tag: Any) -> Any:
    """nfcpy's NDEF object of ``tag`` read from the tag again (nfcpy caches it), or None."""
    tag._ndef = None
    return tag.ndef


def has_password(tag: Any) -> bool:
    """The tag has NTAG21x password protection (a configuration page)."""
    return hasattr(tag, "_cfgpage")


def ndef_area(tag: Any, *, fresh: bool) -> Any:
    """nfcpy's NDEF object of ``tag`` (``fresh``: read from the tag again), or TagIOError saying why not."""
    uid = uid_hex(bytes(tag.identifier))
    ndef = fresh_ndef(tag) if fresh else tag.ndef
    if ndef is None and not _present(tag):
        raise TagIOError(f"tag {uid} left the field during the read")
    if ndef is None:
        raise TagIOError(
            f"tag {uid} ({_kind(tag)}) holds no NDEF data area: not formatted "
            "(edge-agent tag write formats it) or not readable"
        )
    if not ndef.is_readable:
        raise TagIOError(f"tag {uid} ({_kind(tag)}): NDEF area is read-protected")
    return ndef


def authenticate(tag: Any, password: bytes) -> bool:
    """NTAG21x PWD_AUTH with ``password`` (PWD + PACK); False if refused or not an NTAG21x."""
    if len(password) != 6 or not hasattr(tag, "authenticate") or not has_password(tag):
        return False
    try:
        if tag.authenticate(password):
            return True
        # A refused PWD_AUTH is NAKed and leaves the tag idle: select it again to go on reading.
        tag._target = tag.clf.sense(tag.target)
    except _tag_errors():
        pass
    return False


def read_message(tag: Any) -> bytes:
    return bytes(ndef_area(tag, fresh=True).octets)


def write_message(tag: Any, message: bytes, previous: bytes | None = None) -> list[int]:
    """Write ``message`` and verify it by reading back.

    Returns the Type 2 pages, Type 3 blocks or Type 4 NDEF file offsets written; empty for a full
    NDEF write.
    """
    import nfc.tag.tt2
    import nfc.tag.tt3
    import nfc.tag.tt4

    uid = uid_hex(bytes(tag.identifier))
    ndef = ndef_area(tag, fresh=False)
    if not ndef.is_writeable:
        raise TagIOError(f"tag {uid} ({_kind(tag)}) is read-only")
    if len(message) > ndef.capacity:
        raise TagIOError(
            f"tag {uid} ({_kind(tag)}) holds {ndef.capacity} bytes, the message has "
            f"{len(message)} ({len(message) - ndef.capacity} over)"
        )
    on_tag = bytes(ndef.octets)
    if (
        isinstance(tag, nfc.tag.tt2.Type2Tag)
        and len(on_tag) == len(message)
        and (previous is None or previous == on_tag)
    ):
        try:
            pages = _write_changed_pages(ndef, message)
        except nfc.tag.TagCommandError as err:
            _explain_refused_write(tag, err)
            raise
        expected = bytes(ndef._tag_memory[: len(ndef._tag_memory)])
        for first in sorted({p - p % 4 for p in pages}):  # READ returns 4 pages
            if bytes(tag.read(first)) != expected[first * 4 : first * 4 + 16]:
                raise TagIOError(f"tag {uid}: read-back of pages {first}-{first + 3} differs")
        ndef._data = bytearray(message)
        return pages
    if (
        isinstance(tag, nfc.tag.tt3.Type3Tag)
        and len(on_tag) == len(message)
        and (previous is None or previous == on_tag)
    ):
        blocks = _write_changed_blocks(tag, on_tag, message)
        ndef._data = bytearray(message)
        return blocks
    if (
        isinstance(tag, nfc.tag.tt4.Type4Tag)
        and len(on_tag) == len(message)
        and (previous is None or previous == on_tag)
    ):
        offsets = _write_changed_bytes(ndef, on_tag, message)
        ndef._data = bytearray(message)
        return offsets
    ndef.octets = message
    if bytes(ndef_area(tag, fresh=True).octets) != message:
        raise TagIOError(f"tag {uid}: the NDEF message read back differs from the one written")
    return []


def _explain_refused_write(tag: Any, err: Exception) -> None:
    """A NAKed WRITE on an NTAG21x is often password protection: say so when AUTH0 shows it."""
    import nfc.tag.tt2

    if getattr(err, "errno", None) != nfc.tag.tt2.INVALID_PAGE_ERROR or not hasattr(
        tag, "_cfgpage"
    ):
        return
    try:
        tag._target = tag.clf.sense(tag.target)  # the NAK left the tag idle: select it again
        auth0 = tag.read(tag._cfgpage)[3] if tag.target else 0xFF
    except _tag_errors():
        return
    if auth0 < tag._cfgpage:
        uid = uid_hex(bytes(tag.identifier))
        raise TagIOError(
            f"tag {uid} ({_kind(tag)}) is password-protected from page {auth0}: "
            "give the reader its password (reader.password / --password)"
        ) from err


def _write_changed_pages(ndef: Any, message: bytes) -> list[int]:
    """Put ``message`` into the NDEF TLV's value (length unchanged) and write the pages that differ.

    Uses nfcpy's own memory image of the tag from the last read (TLV offset, lock/reserved bytes to
    skip) and its page-diffing ``synchronize``.
    """
    memory = ndef._tag_memory
    skip = ndef._skip_bytes
    offset = ndef._ndef_tlv_offset + (2 if len(message) < 255 else 4)
    changed: set[int] = set()
    for index, octet in enumerate(message):
        while offset + index in skip:
            offset += 1
        if memory[offset + index] != octet:
            memory[offset + index] = octet
            changed.add((offset + index) // 4)
    memory.synchronize()
    return sorted(changed)


def _write_changed_blocks(tag: Any, on_tag: bytes, message: bytes) -> list[int]:
    """Type 3: write the 16-byte data blocks that differ, one Update each, and read them back.

    The attribute block (length, WriteFlag) is left alone: nfcpy's NDEF write raises WriteFlag
    first and clears it last, so a tear in between leaves the tag unreadable. A FeliCa block
    write is all or nothing, so a tear leaves each block old or new.
    """
    padded_old = on_tag + bytes(-len(on_tag) % 16)
    padded_new = message + bytes(-len(message) % 16)
    blocks = [
        1 + i // 16
        for i in range(0, len(padded_new), 16)
        if padded_new[i : i + 16] != padded_old[i : i + 16]
    ]
    for block in blocks:
        tag.write_to_ndef_service(padded_new[(block - 1) * 16 : block * 16], block)
    if blocks:
        # One block per Check: any tag's Nbr allows it, and a progress update changes two or three.
        back = b"".join(bytes(tag.read_from_ndef_service(block)) for block in blocks)
        if back != b"".join(padded_new[(b - 1) * 16 : b * 16] for b in blocks):
            uid = uid_hex(bytes(tag.identifier))
            raise TagIOError(f"tag {uid}: read-back of blocks {blocks[0]}-{blocks[-1]} differs")
    return blocks


def _write_changed_bytes(ndef: Any, on_tag: bytes, message: bytes) -> list[int]:
    """Type 4: UPDATE BINARY each run of bytes that differs, then READ BINARY the runs back.

    NLEN is never touched: nfcpy's NDEF write of a message longer than MLc zeroes it first and
    sets it last, so a tear in between leaves an empty tag. Returns the NDEF file offsets written.
    """
    runs: list[tuple[int, int]] = []  # (start, end) in the message
    for i, (old, new) in enumerate(zip(on_tag, message, strict=True)):
        if old != new:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    if not runs:
        return []
    uid = uid_hex(bytes(ndef.tag.identifier))
    if not ndef._select_fid(ndef._ndef_file):
        raise TagIOError(f"tag {uid}: the NDEF file cannot be selected for writing")
    base = ndef._nlen_size  # the message follows NLEN in the NDEF file
    for start, end in runs:
        while start < end:  # _update_binary writes at most MLc bytes per APDU
            start += ndef._update_binary(base + start, message[start:end])
    for start, end in runs:
        back = b""
        while len(back) < end - start:
            chunk = bytes(ndef._read_binary(base + start + len(back), end - start - len(back)))
            if not chunk:
                break
            back += chunk
        if back != message[start:end]:
            where = f"{base + start}-{base + end - 1}"
            raise TagIOError(f"tag {uid}: read-back of NDEF file bytes {where} differs")
    return [base + i for start, end in runs for i in range(start, end)]


def _present(tag: Any) -> bool:
    import nfc.tag.tt2

    try:
        if isinstance(tag, nfc.tag.tt2.Type2Tag):
            # One READ of page 0 with nfcpy's short read timeout: ~15 ms to notice a tag is gone,
            # where tag.is_present waits 3 x 100 ms and logs a warning for a garbled frame.
            return len(tag.read(0)) == 16
        return bool(tag.is_present)
    except _tag_errors():
        return False


def _tag_errors() -> tuple[type[BaseException], ...]:
    import nfc.clf
    import nfc.tag

    # RuntimeError: nfcpy's Type 2 transceive raises it for a broken link it does not classify.
    return (
        nfc.tag.TagCommandError,
        nfc.clf.CommunicationError,
        RuntimeError,
        AttributeError,
        ValueError,
    )


def _why(err: BaseException) -> str:
    import nfc.tag

    if isinstance(err, nfc.tag.TagCommandError):
        return f"tag command failed ({err}); was the tag moved away?"
    return str(err) or type(err).__name__


def _kind(tag: Any) -> str:
    product = str(getattr(tag, "product", "") or tag.type)
    return product.removeprefix("NXP ")
