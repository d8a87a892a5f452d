"""rabbitkit's own interpreter for the pickle opcodes a PyTorch state_dict uses.

Why our own: the standard unpickler resolves every GLOBAL opcode by importing the
module the file names and then calls whatever REDUCE puts in front of it, so a
weight file can run any code (``os.system``). PyTorch's weights_only mode
restricts that machinery but still hands real objects (real ``torch`` callables,
real classes whose ``__setstate__`` runs on BUILD) to file-controlled opcodes; its
known bypasses (CVE-2025-32434, CVE-2026-24747) came through those gaps. Here
nothing the file names is ever imported or called: a GLOBAL is looked up in a
table of *local stand-ins* given by the caller (see ``torch_globals``), and every
stand-in only records or checks plain data. No opcode can reach a Python object
that was not made by this module or a stand-in.

What is supported is exactly what ``torch.save`` writes for state_dicts and
training checkpoints (protocols 2-5): containers (dict, list, tuple), scalars,
strings and bytes, memo get/put, GLOBAL/STACK_GLOBAL, REDUCE, BINPERSID and BUILD.
Everything else (INST, OBJ, NEWOBJ, EXT*, the text opcodes of protocol 0, sets,
out-of-band buffers) is refused with the opcode's name and offset.

The interpreter is a loop, not a recursion. Depth is capped where containers are
made (a tuple's depth is known when it is built, a list's or dict's grows as items
go in); a container mutated after it was nested can still be deeper than it was
recorded, so whoever walks the result must cap depth too (``unwrap`` does).
"""
import struct

from ..errors import WeightsError
from . import limits

_UNPACK_I = struct.Struct("<i").unpack_from
_UNPACK_H = struct.Struct("<H").unpack_from
_UNPACK_UI = struct.Struct("<I").unpack_from
_UNPACK_Q = struct.Struct("<Q").unpack_from
_UNPACK_D = struct.Struct(">d").unpack_from

# Opcode byte -> name, for the ones we implement and for messages about the rest.
OPCODE_NAMES = {
    0x80: "PROTO", 0x95: "FRAME", 0x2E: "STOP", 0x28: "MARK", 0x30: "POP", 0x31: "POP_MARK", 0x32: "DUP",
    0x7D: "EMPTY_DICT", 0x5D: "EMPTY_LIST", 0x29: "EMPTY_TUPLE", 0x4E: "NONE", 0x88: "NEWTRUE", 0x89: "NEWFALSE",
    0x4A: "BININT", 0x4B: "BININT1", 0x4D: "BININT2", 0x8A: "LONG1", 0x8B: "LONG4", 0x47: "BINFLOAT",
    0x58: "BINUNICODE", 0x8C: "SHORT_BINUNICODE", 0x8D: "BINUNICODE8",
    0x55: "SHORT_BINSTRING", 0x54: "BINSTRING", 0x43: "SHORT_BINBYTES", 0x42: "BINBYTES", 0x8E: "BINBYTES8",
    0x74: "TUPLE", 0x85: "TUPLE1", 0x86: "TUPLE2", 0x87: "TUPLE3",
    0x63: "GLOBAL", 0x93: "STACK_GLOBAL", 0x52: "REDUCE", 0x51: "BINPERSID", 0x62: "BUILD",
    0x71: "BINPUT", 0x72: "LONG_BINPUT", 0x94: "MEMOIZE", 0x68: "BINGET", 0x6A: "LONG_BINGET",
    0x73: "SETITEM", 0x75: "SETITEMS", 0x61: "APPEND", 0x65: "APPENDS",
    # refused:
    0x69: "INST", 0x6F: "OBJ", 0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
    0x50: "PERSID", 0x49: "INT", 0x4C: "LONG", 0x46: "FLOAT", 0x53: "STRING", 0x56: "UNICODE",
    0x70: "PUT", 0x67: "GET", 0x64: "DICT", 0x6C: "LIST", 0x8F: "EMPTY_SET", 0x90: "ADDITEMS",
    0x91: "FROZENSET", 0x96: "BYTEARRAY8", 0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER",
}

_SCALAR_KEY_TYPES = (str, int, float, bool, bytes, type(None))


class Global:
    """A stand-in for a global the file may name; ``call(args)`` is what REDUCE does with it.

    ``call`` is None for globals that are only data (storage types, dtypes): REDUCE on
    them is refused.
    """

    __slots__ = ("name", "call", "value")

    def __init__(self, name, call=None, value=None):
        self.name = name
        self.call = call
        self.value = value

    def __repr__(self):
        return f"<stand-in for {self.name}>"


class PickledOrderedDict(dict):
    """What ``collections.OrderedDict()`` becomes: a dict (insertion-ordered anyway).

    ``attributes`` receives what BUILD sets on it: a real state_dict carries its
    ``_metadata`` (per-module versions) that way, as an attribute, never as an item.
    """

    __slots__ = ("attributes",)

    def __init__(self):
        super().__init__()
        self.attributes = {}


class _Mark:
    __slots__ = ()


_MARK = _Mark()


class PickleVM:
    """Run one pickle from ``data[start:]`` and return (object, end offset).

    ``globals_table``: {"module.name": Global}; ``persistent_load(pid)`` turns a
    BINPERSID id into a stand-in; ``where`` names the file (and part of it) in errors.
    """

    def __init__(self, data, where, globals_table, persistent_load, start=0, end=None):
        self.data = data
        self.where = where
        self.globals_table = globals_table
        self.persistent_load = persistent_load
        self.pos = start
        self.end = len(data) if end is None else end
        self.memo = {}
        self.depth = {}  # id(container) -> nesting depth; containers are kept alive in self.made
        self.made = []

    # -- errors and raw reads -----------------------------------------------------------
    def fail(self, message, at=None):
        at = self.op_at if at is None else at
        raise WeightsError(f"{self.where}: {message} (pickle offset {at})")

    def take(self, n):
        if n < 0 or self.pos + n > self.end:
            self.fail(f"truncated pickle: {n} bytes expected, {max(self.end - self.pos, 0)} present")
        start = self.pos
        self.pos += n
        return self.data[start:self.pos]

    def line(self):
        # GLOBAL's module and name are newline-terminated; a name is short.
        stop = min(self.end, self.pos + 256)
        chunk = bytes(self.data[self.pos:stop])
        newline = chunk.find(b"\n")
        if newline < 0:
            self.fail("GLOBAL name not terminated within 256 bytes")
        self.pos += newline + 1
        try:
            return chunk[:newline].decode("ascii")
        except UnicodeDecodeError:
            self.fail("GLOBAL name is not ASCII")

    def text(self, raw):
        try:
            return bytes(raw).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            self.fail("string is not valid UTF-8")

    # -- depth bookkeeping ----------------------------------------------------------------
    def depth_of(self, obj):
        return self.depth.get(id(obj), 0) if isinstance(obj, (dict, list, tuple)) else 0

    def made_container(self, obj, depth):
        if depth > limits.MAX_DEPTH:
            self.fail(f"containers nested deeper than {limits.MAX_DEPTH} levels")
        self.depth[id(obj)] = depth
        self.made.append(obj)  # keeps ids unique for the life of the run
        return obj

    def grew(self, container, item):
        depth = self.depth_of(item) + 1
        if depth > self.depth.get(id(container), 1):
            self.made_container(container, depth)

    # -- the stack ----------------------------------------------------------------------
    def push(self, obj):
        if len(self.stack) >= limits.MAX_STACK:
            self.fail(f"more than {limits.MAX_STACK} items on the pickle stack")
        self.stack.append(obj)

    def pop(self):
        if not self.stack:
            self.fail("pickle stack underflow")
        obj = self.stack.pop()
        if obj is _MARK:
            self.fail("pickle stack underflow (a MARK was popped as a value)")
        return obj

    def top(self):
        if not self.stack or self.stack[-1] is _MARK:
            self.fail("pickle stack underflow")
        return self.stack[-1]

    def pop_mark(self):
        # MARK pushes a marker on the same stack; the marks are also counted so that
        # their nesting can be capped.
        if not self.marks:
            self.fail("pickle has no MARK to pop back to")
        index = self.marks.pop()
        items = self.stack[index + 1:]
        del self.stack[index:]
        return items

    def memo_put(self, index, obj):
        if index not in self.memo and len(self.memo) >= limits.MAX_MEMO:
            self.fail(f"pickle memo holds more than {limits.MAX_MEMO} entries")
        self.memo[index] = obj

    def memo_get(self, index):
        if index not in self.memo:
            self.fail(f"pickle refers to memo entry {index}, which was never stored")
        self.push(self.memo[index])

    # -- opcodes ------------------------------------------------------------------------
    def run(self):
        self.stack = []
        self.marks = []
        data = self.data
        while True:
            self.op_at = self.pos
            if self.pos >= self.end:
                self.fail("pickle ends without STOP")
            op = data[self.pos]
            self.pos += 1
            if op == 0x80:  # PROTO
                proto = self.take(1)[0]
                if not 2 <= proto <= 5:
                    self.fail(f"pickle protocol {proto} (torch.save writes 2 to 5)")
            elif op == 0x95:  # FRAME: only a read-ahead hint; the length must fit
                (length,) = _UNPACK_Q(self.take(8))
                if length > self.end - self.pos:
                    self.fail(f"FRAME of {length} bytes runs past the end")
            elif op == 0x2E:  # STOP
                result = self.pop()
                if self.stack or self.marks:
                    self.fail("pickle stops with unused items on its stack")
                return result, self.pos
            elif op == 0x28:  # MARK
                if len(self.marks) >= limits.MAX_DEPTH:
                    self.fail(f"MARKs nested deeper than {limits.MAX_DEPTH} levels")
                self.marks.append(len(self.stack))
                self.push(_MARK)
            elif op == 0x30:  # POP
                if self.stack and self.stack[-1] is _MARK:
                    self.pop_mark()
                else:
                    self.pop()
            elif op == 0x31:  # POP_MARK
                self.pop_mark()
            elif op == 0x32:  # DUP
                self.push(self.top())
            elif op == 0x7D:  # EMPTY_DICT
                self.push(self.made_container({}, 1))
            elif op == 0x5D:  # EMPTY_LIST
                self.push(self.made_container([], 1))
            elif op == 0x29:  # EMPTY_TUPLE
                self.push(())
            elif op == 0x4E:
                self.push(None)
            elif op == 0x88:
                self.push(True)
            elif op == 0x89:
                self.push(False)
            elif op == 0x4A:  # BININT
                self.push(_UNPACK_I(self.take(4))[0])
            elif op == 0x4B:  # BININT1
                self.push(self.take(1)[0])
            elif op == 0x4D:  # BININT2
                self.push(_UNPACK_H(self.take(2))[0])
            elif op == 0x8A:  # LONG1
                n = self.take(1)[0]
                self.push(int.from_bytes(self.take(n), "little", signed=True))
            elif op == 0x8B:  # LONG4: only for integers that fit a sane size
                (n,) = _UNPACK_I(self.take(4))
                if not 0 <= n <= 64:
                    self.fail(f"LONG4 integer of {n} bytes (at most 64 accepted)")
                self.push(int.from_bytes(self.take(n), "little", signed=True))
            elif op == 0x47:  # BINFLOAT
                self.push(_UNPACK_D(self.take(8))[0])
            elif op == 0x58:  # BINUNICODE
                self.push(self.text(self.take(_UNPACK_UI(self.take(4))[0])))
            elif op == 0x8C:  # SHORT_BINUNICODE
                self.push(self.text(self.take(self.take(1)[0])))
            elif op == 0x8D:  # BINUNICODE8
                self.push(self.text(self.take(_UNPACK_Q(self.take(8))[0])))
            elif op == 0x55:  # SHORT_BINSTRING (Python 2 str): text if it decodes
                self.push(self.text(self.take(self.take(1)[0])))
            elif op == 0x54:  # BINSTRING
                (n,) = _UNPACK_I(self.take(4))
                self.push(self.text(self.take(n)))
            elif op == 0x43:  # SHORT_BINBYTES
                self.push(bytes(self.take(self.take(1)[0])))
            elif op == 0x42:  # BINBYTES
                self.push(bytes(self.take(_UNPACK_UI(self.take(4))[0])))
            elif op == 0x8E:  # BINBYTES8
                self.push(bytes(self.take(_UNPACK_Q(self.take(8))[0])))
            elif op == 0x74:  # TUPLE
                self.push_tuple(tuple(self.pop_mark_values()))
            elif op == 0x85:
                self.push_tuple((self.pop(),))
            elif op == 0x86:
                b = self.pop()
                self.push_tuple((self.pop(), b))
            elif op == 0x87:
                c = self.pop()
                b = self.pop()
                self.push_tuple((self.pop(), b, c))
            elif op == 0x63:  # GLOBAL
                module = self.line()
                name = self.line()
                self.push(self.lookup(module, name))
            elif op == 0x93:  # STACK_GLOBAL
                name = self.pop()
                module = self.pop()
                if type(module) is not str or type(name) is not str:
                    self.fail("STACK_GLOBAL needs two strings")
                self.push(self.lookup(module, name))
            elif op == 0x52:  # REDUCE
                self.reduce()
            elif op == 0x51:  # BINPERSID
                self.push(self.persistent_load(self.pop(), self))
            elif op == 0x62:  # BUILD
                self.build()
            elif op == 0x71:  # BINPUT
                self.memo_put(self.take(1)[0], self.top())
            elif op == 0x72:  # LONG_BINPUT
                self.memo_put(_UNPACK_UI(self.take(4))[0], self.top())
            elif op == 0x94:  # MEMOIZE
                self.memo_put(len(self.memo), self.top())
            elif op == 0x68:  # BINGET
                self.memo_get(self.take(1)[0])
            elif op == 0x6A:  # LONG_BINGET
                self.memo_get(_UNPACK_UI(self.take(4))[0])
            elif op == 0x73:  # SETITEM
                value = self.pop()
                key = self.pop()
                self.set_items(self.top(), [key, value])
            elif op == 0x75:  # SETITEMS
                items = self.pop_mark_values()
                self.set_items(self.top(), items)
            elif op == 0x61:  # APPEND
                item = self.pop()
                self.append_items(self.top(), [item])
            elif op == 0x65:  # APPENDS
                items = self.pop_mark_values()
                self.append_items(self.top(), items)
            else:
                name = OPCODE_NAMES.get(op)
                if name:
                    self.fail(f"pickle opcode {name} is not allowed in a weight file")
                self.fail(f"byte 0x{op:02x} is not a pickle opcode")

    def pop_mark_values(self):
        items = self.pop_mark()
        if any(item is _MARK for item in items):  # cannot happen: marks are tracked
            self.fail("pickle stack is corrupt")
        return items

    def push_tuple(self, items):
        depth = 1 + max((self.depth_of(x) for x in items), default=0)
        self.push(self.made_container(items, depth))

    def lookup(self, module, name):
        # Only a table lookup: the module the file names is never imported.
        full = f"{module}.{name}"
        stand_in = self.globals_table.get(full)
        if stand_in is None:
            self.fail(f"refusing global '{full}': not on rabbitkit's allow-list of weight-file globals")
        return stand_in

    def reduce(self):
        args = self.pop()
        func = self.top()
        if not isinstance(func, Global) or func.call is None:
            what = func.name if isinstance(func, Global) else type(func).__name__
            self.fail(f"REDUCE calls '{what}', which is not an allowed callable")
        if type(args) is not tuple:
            self.fail(f"REDUCE arguments for '{func.name}' are a {type(args).__name__}, not a tuple")
        result = func.call(args, self)
        if isinstance(result, (dict, list)):
            self.made_container(result, 1 + max((self.depth_of(v) for v in _values(result)), default=0))
        self.stack[-1] = result

    def build(self):
        # BUILD sets an object's state. Of what this interpreter makes, only an
        # OrderedDict has state a state_dict uses: its ``_metadata`` attribute. The
        # state becomes *attributes* of that dict, never items (a plain update would
        # turn ``_metadata`` into a fake weight), and BUILD on anything else (a tensor,
        # a plain dict, a list) is refused: torch's writer never emits it for those.
        state = self.pop()
        inst = self.top()
        if type(inst) is not PickledOrderedDict:
            self.fail(f"BUILD on a {_kind(inst)}: only an OrderedDict's attributes may be set")
        if type(state) is tuple and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or not all(type(k) is str for k in state):
            self.fail(f"BUILD state for an OrderedDict is a {_kind(state)}, not a dict of attribute names")
        inst.attributes.update(state)

    def set_items(self, target, items):
        if not isinstance(target, dict):
            self.fail(f"SETITEM on a {_kind(target)}: only dicts take items")
        if len(items) % 2:
            self.fail("SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            key = items[i]
            # Scalar keys only: hashing a file-made tuple could recurse without bound.
            if type(key) not in _SCALAR_KEY_TYPES:
                self.fail(f"dict key is a {_kind(key)} (only strings, numbers and None are accepted)")
            target[key] = items[i + 1]
            self.grew(target, items[i + 1])

    def append_items(self, target, items):
        if type(target) is not list:
            self.fail(f"APPEND on a {_kind(target)}: only lists take appends")
        target.extend(items)
        for item in items:
            self.grew(target, item)


def _values(container):
    return container.values() if isinstance(container, dict) else container


def _kind(obj):
    if isinstance(obj, Global):
        return f"global '{obj.name}'"
    kind = getattr(obj, "pickle_kind", None)
    return kind or type(obj).__name__
