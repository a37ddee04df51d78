#!/usr/bin/env python3
"""Moves variants of crypt_vfio::Error into a per-layer enum at every use site.

usage: tools/layer_errors.py LAYER [DIR...]  (LAYER: vfio | device | crypto | volume | luks | nbd),
from the repository root; then `cargo fmt`.

`Error::X(..)` becomes `Error::Layer(LayerError::Y(..))` in expressions and patterns alike, and
LayerError is added to the file's import of Error. Re-run on a merged tree to redo the change.
"""
import os, re, sys

LAYERS = {
    'vfio': ('Vfio', 'VfioError', {
        'Dma': 'Dma', 'Transport': 'Transport', 'InvalidAddress': 'InvalidAddress',
        'NoSuchDevice': 'NoSuchDevice', 'NoIommu': 'NoIommu', 'NoVfio': 'NoVfio',
        'PermissionDenied': 'PermissionDenied', 'WrongDriver': 'WrongDriver',
        'GroupNotViable': 'GroupNotViable'}),
    'device': ('Device', 'DeviceError', {
        'UnsupportedDevice': 'Unsupported', 'Init': 'Init', 'DeviceFailed': 'Failed',
        'Timeout': 'Timeout', 'ContractViolation': 'ContractViolation',
        'ConfigUnsettled': 'ConfigUnsettled', 'DeviceGaveUp': 'GaveUp'}),
    'crypto': ('Crypto', 'CryptoError', {
        'KeyLength': 'KeyLength', 'KeyRejected': 'KeyRejected', 'InvalidRequest': 'InvalidRequest',
        'TooLarge': 'TooLarge', 'NotSupported': 'NotSupported', 'InvalidSession': 'InvalidSession',
        'NoSpace': 'NoSpace', 'AuthFailed': 'AuthFailed', 'DeviceError': 'Status'}),
    'volume': ('Volume', 'VolumeError', {
        'OutOfRange': 'OutOfRange', 'ReadOnly': 'ReadOnly', 'InvalidVolume': 'Invalid',
        'TooSmall': 'TooSmall', 'UnsupportedCipher': 'UnsupportedCipher', 'Truncated': 'Truncated',
        'SectorAuthFailed': 'SectorAuthFailed', 'Sector': 'Sector', 'WrongKey': 'WrongKey'}),
    'luks': ('Luks', 'LuksError', {
        'WrongPassphrase': 'WrongPassphrase', 'NotLuks': 'NotLuks', 'CorruptHeader': 'CorruptHeader',
        'Keyslot': 'Keyslot', 'Unsupported': 'Unsupported'}),
    'nbd': ('Nbd', 'NbdError', {'Protocol': 'Protocol'}),
}

def close_of(s, i):
    """Index just past the bracket group opening at s[i]."""
    pairs = {'(': ')', '{': '}'}
    stack = [pairs[s[i]]]
    j = i + 1
    in_str = False
    while j < len(s) and stack:
        c = s[j]
        if in_str:
            if c == '\\': j += 1
            elif c == '"': in_str = False
        elif c == '"': in_str = True
        elif c in pairs: stack.append(pairs[c])
        elif c in ')}':
            stack.pop()
        j += 1
    return j

def rewrite(text, variant_map, outer, enum, lib):
    pat = re.compile(r'(?<![\w:])((?:crypt_vfio::|crate::error::|crate::)?)Error::(' + '|'.join(variant_map) + r')\b(?!\s*::)')
    out, pos, used_bare = [], 0, False
    for m in pat.finditer(text):
        if m.start() < pos:
            continue
        prefix, var = m.group(1), m.group(2)
        end = m.end()
        k = end
        while k < len(text) and text[k] == ' ': k += 1
        if k < len(text) and text[k] in '({' and not (text[k] == '{' and var in ('ReadOnly', 'AuthFailed', 'InvalidSession', 'WrongPassphrase', 'WrongKey')):
            end = close_of(text, k)
        payload = text[m.end():end]
        # Payloads may hold further Error::X of this layer (Sector { source: Box<Error> }).
        payload = rewrite(payload, variant_map, outer, enum, lib)[0]
        if prefix:
            epath = ('crypt_vfio::' if prefix == 'crypt_vfio::' else 'crate::error::') + enum
        else:
            epath = enum
            used_bare = True
        out.append(text[pos:m.start()])
        out.append(f'{prefix}Error::{outer}({epath}::{variant_map[var]}{payload})')
        pos = end
    out.append(text[pos:])
    return ''.join(out), used_bare

def add_import(text, enum, lib):
    root = 'crate::error' if lib else 'crypt_vfio'
    # Extend the first import that brings Error in.
    pats = [
        (re.compile(r'use (crate::error|crypt_vfio|crate)::\{([^}]*)\};'), 'brace'),
        (re.compile(r'use (crate::error|crypt_vfio|crate)::Error;'), 'single'),
    ]
    for p, kind in pats:
        for m in p.finditer(text):
            if kind == 'brace':
                names = [n.strip() for n in m.group(2).split(',') if n.strip()]
                if 'Error' not in names:
                    continue
                if enum in names:
                    return text
                names.append(enum)
                names.sort(key=lambda n: (n != 'self', n))
                new = f'use {m.group(1)}::{{{", ".join(names)}}};'
            else:
                new = f'use {m.group(1)}::{{{enum}, Error}};'
            return text[:m.start()] + new + text[m.end():]
    # No import of Error: a separate line after the first `use`.
    m = re.search(r'^use [^\n]*;\n', text, re.M)
    line = f'use {root}::{enum};\n'
    if m:
        return text[:m.start()] + line + text[m.start():]
    return line + text

def rewrite_comments(text, variant_map, enum, lib):
    """In comments, `Error::X` names the variant where it now lives: `LayerError::Y`; a doc link
    gets an explicit target, so that it resolves without an import."""
    pat = re.compile(r'(\[`)?(?<![\w:])(?:crypt_vfio::|crate::error::|crate::)?Error::(' + '|'.join(variant_map) + r')\b(?!\s*::)(`\](?!\())?')
    def fix(line):
        if not line.lstrip().startswith('//'):
            return line
        def sub(m):
            name = f'{enum}::{variant_map[m.group(2)]}'
            if m.group(1) and m.group(3):
                target = ('crate::error::' if lib else 'crypt_vfio::') + name
                return f'[`{name}`]({target})'
            return (m.group(1) or '') + name + (m.group(3) or '')
        return pat.sub(sub, line)
    return '\n'.join(fix(l) for l in text.split('\n'))

def main():
    outer, enum, variants = LAYERS[sys.argv[1]]
    roots = sys.argv[2:] or ['src', 'tests', 'benches', 'examples', 'fuzz/src', 'fuzz/fuzz_targets']
    for root in roots:
        for dp, _, files in os.walk(root):
            for f in files:
                if not f.endswith('.rs'): continue
                p = os.path.join(dp, f)
                if p == 'src/error.rs': continue
                text = open(p).read()
                lib = p.startswith('src/') and not p.startswith('src/cli') and p != 'src/main.rs'
                new = rewrite_comments(text, variants, enum, lib)
                new, _ = rewrite(new, variants, outer, enum, None)
                # Bare uses need an import (also after an earlier run that missed one).
                code = '\n'.join(l for l in new.split('\n') if not l.lstrip().startswith('//'))
                bare = re.search(r'(?<![\w:])' + enum + r'::', code)
                if bare and not re.search(r'^\s*use [^;]*\b' + enum + r'\b[^;]*;', new, re.M):
                    new = add_import(new, enum, lib)
                if re.search(r'^\s*use [^;]*\b' + enum + r'\b[^;]*;', new, re.M):
                    # In scope: an explicit link target would be redundant (rustdoc warns).
                    new = re.sub(r'\[`(' + enum + r'::\w+)`\]\((?:crate::error|crypt_vfio)::\1\)', r'[`\1`]', new)
                if new == text: continue
                open(p, 'w').write(new)
                print('rewrote', p)

main()
