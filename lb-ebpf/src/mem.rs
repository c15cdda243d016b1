//! Copying and zeroing structs in map and stack memory word by word. bpf-linker has LLVM expand
//! `memcpy` inline, but not `memset` or `memmove`: zeroing a struct, or copying one between
//! pointers that may alias (a map value into scratch memory), becomes a call of
//! compiler-builtins' byte-at-a-time loop, 4-5 instructions per byte, on paths every packet
//! takes. Volatile 32-bit accesses keep LLVM from merging the words back into such a call.

/// The number of 32-bit words of `T`, checked at compile time: whole words, word-aligned.
const fn words<T>() -> usize {
    assert!(core::mem::size_of::<T>().is_multiple_of(4) && core::mem::align_of::<T>() >= 4);
    core::mem::size_of::<T>() / 4
}

/// `*dst = *src`, a word at a time.
#[inline(always)]
pub fn copy<T: Copy>(dst: &mut T, src: &T) {
    let n = const { words::<T>() };
    let (dst, src) = (
        core::ptr::from_mut(dst).cast::<u32>(),
        core::ptr::from_ref(src).cast::<u32>(),
    );
    for i in 0..n {
        // SAFETY: both references cover `n` aligned words (checked in `words`), and `T: Copy`
        // has no invariant a bitwise copy could break.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
}

/// Sets `*dst` to all zero bits, a word at a time. Only for types for which all zeros is a
/// value (plain numbers, C structs of them).
#[inline(always)]
pub fn zero<T: Copy>(dst: &mut T) {
    let n = const { words::<T>() };
    let dst = core::ptr::from_mut(dst).cast::<u32>();
    for i in 0..n {
        // SAFETY: the reference covers `n` aligned words (checked in `words`); callers pass
        // plain-number types, for which zero bits are a value.
        unsafe { core::ptr::write_volatile(dst.add(i), 0) };
    }
}
