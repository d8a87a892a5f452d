"""Caps on what a weight file may make the readers do.

A weight file is untrusted input: every count, length and size in it is checked
against the bytes really present, and the structures that cost memory or
recursion without being backed by bytes (pickle memo, nesting, zip entries that
are read whole) are capped here. The readers look the values up at call time
(``limits.X``), so a test can lower a cap with ``monkeypatch.setattr``.
"""

#: data.pkl (zip format) and the pickled part of a legacy file are read whole.
#: A state_dict's pickle holds only names and shapes: a few KB per hundred tensors.
MAX_PICKLE_BYTES = 256 * 2**20

#: Small zip entries that are read whole (byteorder, version).
MAX_SMALL_ENTRY_BYTES = 4096

#: One storage (zip entry or legacy storage) read into memory.
MAX_STORAGE_BYTES = 64 * 2**30

#: Entries in the pickle memo (BINPUT/MEMOIZE); a state_dict uses about eight per tensor.
MAX_MEMO = 2**21

#: Items on the pickle stack at once (the stack is popped as objects are built).
MAX_STACK = 2**20

#: Containers inside containers (pickle MARK nesting, tuples in tuples, dicts in dicts).
#: A state_dict wrapped in a checkpoint is 3-4 levels deep.
MAX_DEPTH = 64

#: Dimensions of one tensor.
MAX_NDIM = 32

#: The safetensors JSON header (the safetensors package refuses above 100 MB too).
MAX_SAFETENSORS_HEADER = 100 * 2**20

