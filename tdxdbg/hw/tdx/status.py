"""TDX completion status codes (RAX) and operand ids.

Values from intel/tdx-module `tdx_error_codes_defs.h` and Linux `arch/x86/kvm/vmx/tdx_errno.h`.
Bits 63:32 are the class and code, bits 31:0 the operand id or details.
"""

from __future__ import annotations

import enum

# KVM's TDX_SEAMCALL_STATUS_MASK: the part of RAX that names the status, without operand details.
STATUS_MASK = 0xFFFF_FFFF_0000_0000
OPERAND_MASK = 0x0000_0000_FFFF_FFFF
TDX_ERROR_BIT = 1 << 63
TDX_NON_RECOVERABLE_BIT = 1 << 62


class TdxStatus(enum.IntEnum):
    TDX_SUCCESS = 0x0000000000000000
    TDX_NON_RECOVERABLE_VCPU = 0x4000000100000000
    TDX_NON_RECOVERABLE_TD = 0x6000000200000000
    TDX_INTERRUPTED_RESUMABLE = 0x8000000300000000
    TDX_INTERRUPTED_RESTARTABLE = 0x8000000400000000
    TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE = 0x6000000500000000
    TDX_NON_RECOVERABLE_TD_WRONG_APIC_MODE = 0xE000000700000000
    TDX_NON_RECOVERABLE_TD_CORRUPTED_MD = 0x6000000A00000000
    TDX_OPERAND_INVALID = 0xC000010000000000
    TDX_OPERAND_ADDR_RANGE_ERROR = 0xC000010100000000
    TDX_OPERAND_BUSY = 0x8000020000000000
    TDX_PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
    TDX_SYS_BUSY = 0x8000020200000000
    TDX_RND_NO_ENTROPY = 0x8000020300000000
    TDX_OPERAND_BUSY_HOST_PRIORITY = 0x8000020400000000
    TDX_HOST_PRIORITY_BUSY_TIMEOUT = 0x9000020500000000
    TDX_PAGE_METADATA_INCORRECT = 0xC000030000000000
    TDX_PAGE_ALREADY_FREE = 0x0000030100000000
    TDX_PAGE_NOT_OWNED_BY_TD = 0xC000030200000000
    TDX_PAGE_NOT_FREE = 0xC000030300000000
    TDX_TD_ASSOCIATED_PAGES_EXIST = 0xC000040000000000
    TDX_TD_FATAL = 0xE000060400000000
    TDX_TDCS_NOT_ALLOCATED = 0xC000060600000000
    TDX_LIFECYCLE_STATE_INCORRECT = 0xC000060700000000
    TDX_OP_STATE_INCORRECT = 0xC000060800000000
    TDX_NO_VCPUS = 0xC000060900000000
    TDX_VCPU_ASSOCIATED = 0x8000070100000000
    TDX_VCPU_NOT_ASSOCIATED = 0x8000070200000000
    TDX_TD_KEYS_NOT_CONFIGURED = 0x8000081000000000
    TDX_KEY_CONFIGURED = 0x0000081500000000
    TDX_WBCACHE_NOT_COMPLETE = 0x8000081700000000
    TDX_NO_HKID_READY_TO_WBCACHE = 0x0000082100000000
    TDX_WBCACHE_RESUME_ERROR = 0xC000082300000000
    TDX_FLUSHVP_NOT_DONE = 0x8000082400000000
    TDX_EPT_WALK_FAILED = 0xC0000B0000000000
    TDX_EPT_ENTRY_FREE = 0xC0000B0100000000
    TDX_EPT_ENTRY_NOT_FREE = 0xC0000B0200000000
    TDX_EPT_ENTRY_NOT_PRESENT = 0xC0000B0300000000
    TDX_EPT_ENTRY_NOT_LEAF = 0xC0000B0400000000
    TDX_EPT_ENTRY_LEAF = 0xC0000B0500000000
    TDX_GPA_RANGE_NOT_BLOCKED = 0xC0000B0600000000
    TDX_GPA_RANGE_ALREADY_BLOCKED = 0x00000B0700000000
    TDX_TLB_TRACKING_NOT_DONE = 0xC0000B0800000000
    TDX_EPT_INVALID_PROMOTE_CONDITIONS = 0xC0000B0900000000
    TDX_PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
    TDX_PAGE_SIZE_MISMATCH = 0xC0000B0B00000000
    TDX_GPA_RANGE_BLOCKED = 0xC0000B0C00000000
    TDX_EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
    TDX_EPT_PAGE_NOT_FREE = 0xC0000B0E00000000
    TDX_L2_SEPT_WALK_FAILED = 0xC0000B0F00000000
    # Software-defined by the Linux wrappers (asm/tdx.h), never produced by the module itself.
    TDX_SW_ERROR = 0x8000FF0000000000
    TDX_SEAMCALL_VMFAILINVALID = 0x8000FF00FFFF0000


class OperandId(enum.IntEnum):
    """Operand ids in status bits 31:0 (tdx_error_codes_defs.h `OPERAND_ID_*`)."""

    RAX = 0
    RCX = 1
    RDX = 2
    R8 = 8
    R9 = 9
    R10 = 10
    R11 = 11
    TDR = 128
    SEPT_TREE = 146
    SEPT_ENTRY = 147
    TD_EPOCH = 169
    OP_STATE = 172
    KOT = 186
    KET = 187
    WBCACHE = 188


_BY_VALUE = {s.value: s for s in TdxStatus}


def status_base(rax: int) -> int:
    return rax & STATUS_MASK


def is_error(rax: int) -> bool:
    return bool(rax & TDX_ERROR_BIT)


def status_of(rax: int) -> TdxStatus | None:
    """The named status in RAX bits 63:32, or None for a value the module never returns."""
    return _BY_VALUE.get(rax & STATUS_MASK)


def status_name(rax: int) -> str:
    """The status name without operand details, e.g. "TDX_OPERAND_BUSY"; unknown values in hex."""
    status = status_of(rax)
    return status.name if status is not None else f"{rax & STATUS_MASK:#018x}"


def describe(rax: int) -> str:
    """Status name with its operand id, e.g. "TDX_OPERAND_BUSY|SEPT_TREE"."""
    name = status_name(rax)
    low = rax & OPERAND_MASK
    if not low:
        return name
    try:
        return f"{name}|{OperandId(low).name}"
    except ValueError:
        return f"{name}|{low:#x}"


def parse_status(text: str) -> int:
    """A status given by name ("TDX_OPERAND_BUSY", "TDX_OPERAND_BUSY|SEPT_TREE") or as an integer."""
    text = text.strip()
    base, _, operand = text.partition("|")
    try:
        value = TdxStatus[base.strip()].value
    except KeyError:
        try:
            value = int(base, 0)
        except ValueError:
            raise ValueError(f"unknown TDX status {base.strip()!r}") from None
    if operand:
        op = operand.strip()
        try:
            value |= OperandId[op].value
        except KeyError:
            try:
                value |= int(op, 0)
            except ValueError:
                raise ValueError(f"unknown operand id {op!r}") from None
    return value
