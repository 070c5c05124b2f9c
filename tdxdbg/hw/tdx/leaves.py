"""SEAMCALL and TDCALL leaf numbers (TDX module include/tdx_api_defs.h)."""

from __future__ import annotations

import enum

# RAX bits 15:0 carry the leaf, bits 23:16 its version (not modelled: the enums below are the leaf numbers).


class Seamcall(enum.IntEnum):
    TDH_VP_ENTER = 0
    TDH_MNG_ADDCX = 1
    TDH_MEM_PAGE_ADD = 2
    TDH_MEM_SEPT_ADD = 3
    TDH_VP_ADDCX = 4
    TDH_MEM_PAGE_RELOCATE = 5
    TDH_MEM_PAGE_AUG = 6
    TDH_MEM_RANGE_BLOCK = 7
    TDH_MNG_KEY_CONFIG = 8
    TDH_MNG_CREATE = 9
    TDH_VP_CREATE = 10
    TDH_MNG_RD = 11
    TDH_MEM_RD = 12
    TDH_MEM_WR = 14
    TDH_MEM_PAGE_DEMOTE = 15
    TDH_MR_EXTEND = 16
    TDH_MR_FINALIZE = 17
    TDH_VP_FLUSH = 18
    TDH_MNG_VPFLUSHDONE = 19
    TDH_MNG_KEY_FREEID = 20
    TDH_MNG_INIT = 21
    TDH_VP_INIT = 22
    TDH_MEM_PAGE_PROMOTE = 23
    TDH_PHYMEM_PAGE_RDMD = 24
    TDH_MEM_SEPT_RD = 25
    TDH_VP_RD = 26
    TDH_MNG_KEY_RECLAIMID = 27
    TDH_PHYMEM_PAGE_RECLAIM = 28
    TDH_MEM_PAGE_REMOVE = 29
    TDH_MEM_SEPT_REMOVE = 30
    TDH_MEM_TRACK = 38
    TDH_MEM_RANGE_UNBLOCK = 39
    TDH_PHYMEM_CACHE_WB = 40
    TDH_PHYMEM_PAGE_WBINVD = 41
    TDH_MEM_SEPT_WR = 42
    TDH_VP_WR = 43

    @property
    def dotted(self) -> str:
        """The spec's spelling: TDH.MEM.PAGE.AUG."""
        return self.name.replace("_", ".")

    @classmethod
    def parse(cls, text: str) -> Seamcall:
        key = text.strip().upper().replace(".", "_")
        try:
            return cls[key]
        except KeyError:
            raise ValueError(f"unknown SEAMCALL leaf {text!r}") from None


class Tdcall(enum.IntEnum):
    TDG_VP_VMCALL = 0
    TDG_VP_INFO = 1
    TDG_VP_VEINFO_GET = 3
    TDG_MEM_PAGE_ACCEPT = 6
    TDG_VM_RD = 7
    TDG_VM_WR = 8
    TDG_MEM_PAGE_ATTR_RD = 23
    TDG_MEM_PAGE_ATTR_WR = 24

    @property
    def dotted(self) -> str:
        return self.name.replace("_", ".")


class Tdvmcall(enum.IntEnum):
    """TDG.VP.VMCALL sub-functions in R11 (GHCI); the ones below 0x10000 are VMX exit reasons."""

    EPT_VIOLATION = 48
    MAP_GPA = 0x10001
    GET_QUOTE = 0x10002
    REPORT_FATAL_ERROR = 0x10003
    SETUP_EVENT_NOTIFY_INTERRUPT = 0x10004


class TdvmcallStatus(enum.IntEnum):
    """TDG.VP.VMCALL completion status returned in R10 (GHCI)."""

    SUCCESS = 0
    RETRY = 1
    OPERAND_INVALID = 0x8000000000000000
    GPA_INUSE = 0x8000000000000001
    ALIGN_ERROR = 0x8000000000000002
    SUBFUNC_UNSUPPORTED = 0x8000000000000003
