//! The guest: a small 64-bit program, assembled at start with iced-x86, that writes
//! pages at the rate the VMM allows, keeps a table of the generation it wrote to each
//! page, and checks every page it ever wrote when the VMM asks.
//!
//! Guest physical layout (identity-mapped with 2 MiB pages):
//!
//! | address | what |
//! | --- | --- |
//! | `0x500` | GDT (null, 64-bit code, data) |
//! | `0x1000` | PML4, `0x2000` PDPT, `0x3000..` one PD per GiB |
//! | [`MAILBOX`] | VMM → guest: command sequence, command, host wall clock |
//! | [`CODE`] | this program |
//! | [`GEN_TABLE`] | `u32` generation per guest page (0 = never written) |
//! | [`data_start`] .. end | the pages the vCPUs write, split evenly between them |
//!
//! Each written page holds its page number (word 0), its generation (word 1), words
//! derived from both in every 512-byte block, and a body derived from the page number
//! ([`page_word`]); the VMM fills every data page at boot, the guest rewrites the
//! generation's words, and the self-check compares the header, the generation words
//! and a body word of every block of every page it wrote against the table.
//!
//! Port I/O, the guest's only way out:
//! - `in eax, TICK`: the heartbeat, and the VMM's answer is how many pages to write
//!   next (the VMM paces the guest by sleeping here);
//! - `out CHECKED, eax` then `out WRONG, eax`: a self-check's result.

use anyhow::Context;
use iced_x86::code_asm::*;

/// GDT address.
pub const GDT: u64 = 0x500;
/// PML4 address; the PDPT and PDs follow it.
pub const PML4: u64 = 0x1000;
/// Mailbox page: `+0` command sequence (u64), `+8` command (u64), `+16` host wall
/// clock in ns (u64), written by the VMM.
pub const MAILBOX: u64 = 0x8000;
/// Mailbox offset of the host wall clock the VMM writes.
pub const MAILBOX_WALLCLOCK: u64 = 16;
/// Where the program is loaded and starts.
pub const CODE: u64 = 0x10000;
/// Generation table, one `u32` per guest page.
pub const GEN_TABLE: u64 = 0x10_0000;
/// Heartbeat / token request port (`in`, 32 bits).
pub const PORT_TICK: u16 = 0x10;
/// Self-check: pages checked (`out`, 32 bits).
pub const PORT_CHECKED: u16 = 0x11;
/// Self-check: pages wrong (`out`, 32 bits); ends a report.
pub const PORT_WRONG: u16 = 0x12;
/// Mailbox command: check every page written so far.
pub const CMD_CHECK: u64 = 1;
/// Most guest memory the page tables map (one PD per GiB, four PDs).
pub const MAX_MEM: u64 = 4 << 30;
/// Page size.
pub const PAGE: u64 = 4096;

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const K3: u64 = 0x1656_67B1_9E37_79F9;

/// Every `GEN_STRIDE`-th word (from word `GEN_STRIDE - 1`) depends on the generation.
pub const GEN_STRIDE: u64 = 64;

/// Word `j` (0..512) of guest page `page` at generation `gen` (0 = as the VMM filled it
/// at boot). Words 0 and 1 are the page number and the generation; the last word of
/// every 512-byte block depends on both; the rest depends on the page only (the body,
/// which the VMM writes once at boot, so the guest's writes cost it a few instructions:
/// this host's nested KVM runs guest code slowly).
pub fn page_word(page: u64, generation: u64, j: u64) -> u64 {
    match j {
        0 => page,
        1 => generation,
        _ if j % GEN_STRIDE == GEN_STRIDE - 1 => {
            let seed = page.wrapping_mul(K1) ^ generation.wrapping_mul(K2);
            seed.wrapping_add(j.wrapping_mul(K3))
        }
        _ => page
            .wrapping_mul(K1)
            .wrapping_add((j >> 2).wrapping_mul(K3)),
    }
}

/// First guest page the vCPUs write: after the generation table, 2 MiB aligned.
pub fn data_start(mem_bytes: u64) -> u64 {
    let table = mem_bytes / PAGE * 4;
    (GEN_TABLE + table).next_multiple_of(2 << 20)
}

/// The data pages `[first, end)` (guest page numbers) vCPU `id` of `vcpus` writes.
pub fn vcpu_pages(mem_bytes: u64, vcpus: u64, id: u64) -> (u64, u64) {
    let first = data_start(mem_bytes) / PAGE;
    let end = mem_bytes / PAGE;
    let per = (end - first) / vcpus;
    let lo = first + per * id;
    let hi = if id + 1 == vcpus { end } else { lo + per };
    (lo, hi)
}

/// Initial general-purpose registers of vCPU `id`: the program reads its page range
/// from r12/r13 and keeps its cursor in r14 and the last mailbox sequence in r15.
pub fn initial_regs(mem_bytes: u64, vcpus: u64, id: u64) -> kvm_bindings::kvm_regs {
    let (lo, hi) = vcpu_pages(mem_bytes, vcpus, id);
    kvm_bindings::kvm_regs {
        rip: CODE,
        rflags: 2,
        r12: lo,
        r13: hi,
        r14: lo,
        r15: 0,
        ..Default::default()
    }
}

/// The GDT's three descriptors: null, 64-bit code (selector 8), data (selector 0x10).
pub fn gdt() -> [u64; 3] {
    [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
}

/// Page tables identity-mapping `mem_bytes` (rounded up to GiB) with 2 MiB pages, as
/// `(guest address, entry)` pairs.
pub fn page_tables(mem_bytes: u64) -> Vec<(u64, u64)> {
    let pdpt = PML4 + 0x1000;
    let gibs = mem_bytes.div_ceil(1 << 30);
    let mut out = vec![(PML4, pdpt | 3)];
    for g in 0..gibs {
        let pd = pdpt + 0x1000 * (g + 1);
        out.push((pdpt + g * 8, pd | 3));
        for i in 0..512u64 {
            let phys = (g << 30) | (i << 21);
            out.push((pd + i * 8, phys | 0x83));
        }
    }
    out
}

/// Assembles the guest program for address [`CODE`].
pub fn program() -> anyhow::Result<Vec<u8>> {
    let mut a = CodeAssembler::new(64)?;
    assemble(&mut a).map_err(|e| anyhow::anyhow!("assembling the guest: {e}"))?;
    a.assemble(CODE).context("encoding the guest")
}

fn assemble(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let gen_table = GEN_TABLE as i32;
    let mut main_loop = a.create_label();
    let mut write_loop = a.create_label();
    let mut no_wrap = a.create_label();
    let mut check_mail = a.create_label();
    let mut chk_page = a.create_label();
    let mut chk_bad = a.create_label();
    let mut chk_next = a.create_label();
    let mut chk_done = a.create_label();

    // Heartbeat: the VMM answers with the number of pages to write.
    a.set_label(&mut main_loop)?;
    a.mov(dx, PORT_TICK as u32)?;
    a.in_(eax, dx)?;
    a.mov(ebp, eax)?;

    a.set_label(&mut write_loop)?;
    a.test(rbp, rbp)?;
    a.jz(check_mail)?;
    // Write page r14: generation += 1 in the table, then the page's words that
    // depend on the generation.
    a.mov(rdi, r14)?;
    a.mov(eax, dword_ptr(rdi * 4 + gen_table))?;
    a.inc(eax)?;
    a.mov(dword_ptr(rdi * 4 + gen_table), eax)?;
    a.mov(rsi, rdi)?;
    a.shl(rsi, 12)?;
    a.mov(qword_ptr(rsi), rdi)?;
    a.mov(qword_ptr(rsi + 8), rax)?;
    gen_words(a, |a, off| a.mov(qword_ptr(rsi + off), rbx))?;
    // Next page, wrapping inside this vCPU's range.
    a.inc(r14)?;
    a.cmp(r14, r13)?;
    a.jb(no_wrap)?;
    a.mov(r14, r12)?;
    a.set_label(&mut no_wrap)?;
    a.dec(rbp)?;
    a.jmp(write_loop)?;

    // A new command in the mailbox?
    a.set_label(&mut check_mail)?;
    a.mov(rax, qword_ptr(MAILBOX))?;
    a.cmp(rax, r15)?;
    a.je(main_loop)?;
    a.mov(r15, rax)?;
    a.mov(rax, qword_ptr(MAILBOX + 8))?;
    a.cmp(rax, CMD_CHECK as i32)?;
    a.jne(main_loop)?;

    // Self-check: r8 = pages checked, r9 = pages wrong.
    a.xor(r8, r8)?;
    a.xor(r9, r9)?;
    a.mov(rdi, r12)?;
    a.set_label(&mut chk_page)?;
    a.cmp(rdi, r13)?;
    a.jae(chk_done)?;
    a.mov(eax, dword_ptr(rdi * 4 + gen_table))?;
    a.test(eax, eax)?;
    a.jz(chk_next)?;
    a.inc(r8)?;
    a.mov(rsi, rdi)?;
    a.shl(rsi, 12)?;
    a.cmp(qword_ptr(rsi), rdi)?;
    a.jne(chk_bad)?;
    a.cmp(qword_ptr(rsi + 8), rax)?;
    a.jne(chk_bad)?;
    gen_words(a, |a, off| {
        a.cmp(qword_ptr(rsi + off), rbx)?;
        a.jne(chk_bad)
    })?;
    body_words(a, |a, off| {
        a.cmp(qword_ptr(rsi + off), rbx)?;
        a.jne(chk_bad)
    })?;
    a.jmp(chk_next)?;
    a.set_label(&mut chk_bad)?;
    a.inc(r9)?;
    a.set_label(&mut chk_next)?;
    a.inc(rdi)?;
    a.jmp(chk_page)?;
    a.set_label(&mut chk_done)?;
    a.mov(dx, PORT_CHECKED as u32)?;
    a.mov(eax, r8d)?;
    a.out(dx, eax)?;
    a.mov(dx, PORT_WRONG as u32)?;
    a.mov(eax, r9d)?;
    a.out(dx, eax)?;
    a.jmp(main_loop)?;
    Ok(())
}

/// For each generation word of page rdi (generation rax, page at rsi), rbx = its
/// value, then `each(offset)`. Clobbers rbx, rdx, r10.
fn gen_words(
    a: &mut CodeAssembler,
    mut each: impl FnMut(&mut CodeAssembler, i32) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    // rdx = page * K1 ^ generation * K2
    a.mov(rdx, rdi)?;
    a.mov(r10, K1)?;
    a.imul_2(rdx, r10)?;
    a.mov(rbx, rax)?;
    a.mov(r10, K2)?;
    a.imul_2(rbx, r10)?;
    a.xor(rdx, rbx)?;
    // word j = rdx + j * K3, j = 63, 127, ...
    a.mov(rbx, (GEN_STRIDE - 1).wrapping_mul(K3))?;
    a.add(rbx, rdx)?;
    a.mov(r10, GEN_STRIDE.wrapping_mul(K3))?;
    let mut j = GEN_STRIDE - 1;
    while j < PAGE / 8 {
        each(a, (j * 8) as i32)?;
        a.add(rbx, r10)?;
        j += GEN_STRIDE;
    }
    Ok(())
}

/// For one body word in every 512-byte block of page rdi (at rsi), rbx = its value,
/// then `each(offset)`. Clobbers rbx, r10.
fn body_words(
    a: &mut CodeAssembler,
    mut each: impl FnMut(&mut CodeAssembler, i32) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    const FIRST: u64 = 31;
    // word j = page * K1 + (j >> 2) * K3, j = 31, 95, ...
    a.mov(rbx, rdi)?;
    a.mov(r10, K1)?;
    a.imul_2(rbx, r10)?;
    a.mov(r10, (FIRST >> 2).wrapping_mul(K3))?;
    a.add(rbx, r10)?;
    a.mov(r10, (GEN_STRIDE >> 2).wrapping_mul(K3))?;
    let mut j = FIRST;
    while j < PAGE / 8 {
        each(a, (j * 8) as i32)?;
        a.add(rbx, r10)?;
        j += GEN_STRIDE;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_assembles_and_fits_below_the_table() {
        let code = program().unwrap();
        assert!(!code.is_empty());
        assert!(CODE + code.len() as u64 <= GEN_TABLE);
    }

    #[test]
    fn page_words_depend_on_generation_where_the_guest_writes() {
        let (p, g) = (12345, 7);
        assert_eq!(page_word(p, g, 0), p);
        assert_eq!(page_word(p, g, 1), g);
        assert_ne!(page_word(p, g, 63), page_word(p, g + 1, 63));
        assert_eq!(page_word(p, g, 31), page_word(p, g + 1, 31));
        assert_eq!(page_word(p, g, 30), page_word(p, g, 29));
    }

    #[test]
    fn vcpu_ranges_split_the_data_pages() {
        let mem = 128 << 20;
        let (a0, a1) = vcpu_pages(mem, 2, 0);
        let (b0, b1) = vcpu_pages(mem, 2, 1);
        assert_eq!(a0, data_start(mem) / PAGE);
        assert_eq!(a1, b0);
        assert_eq!(b1, mem / PAGE);
    }
}
