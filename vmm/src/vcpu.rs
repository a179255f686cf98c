//! vCPUs: register set-up for the 64-bit Linux boot protocol, and the run loop (one thread
//! each) that routes I/O and MMIO exits to the buses.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::bus::Bus;
use crate::cpuid;
use crate::devices::GuestMemory;
use crate::error::{Error, Result};
use crate::layout;
use crate::lifecycle::{ExitReason, Lifecycle};
use crate::vm::Vm;

/// Shared between the vCPU threads and whoever pauses, resumes or stops them.
#[derive(Default)]
pub struct RunControl {
    paused: Mutex<bool>,
    cv: Condvar,
    parked: AtomicUsize,
    stop: AtomicBool,
}

impl RunControl {
    pub fn set_paused(&self, p: bool) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = p;
        self.cv.notify_all();
    }
    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Blocks while paused. Returns false when the vCPU should end.
    fn checkpoint(&self) -> bool {
        let mut p = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if *p && !self.stop.load(Ordering::SeqCst) {
            self.parked.fetch_add(1, Ordering::SeqCst);
            while *p && !self.stop.load(Ordering::SeqCst) {
                p = self.cv.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
        !self.stop.load(Ordering::SeqCst)
    }
}

pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub lifecycle: Arc<Lifecycle>,
    pub control: Arc<RunControl>,
    /// Exits to user space so far, per vCPU; the progress watchdog reads them.
    pub exits: Arc<Vec<AtomicU64>>,
}

/// Set up one vCPU. Only the boot vCPU gets boot registers: the others wait for
/// INIT/SIPI from the guest (KVM's in-kernel LAPIC handles that).
pub fn create(vm: &Vm, mem: &GuestMemory, id: u8, nr: u8, entry: Option<u64>) -> Result<VcpuFd> {
    let vcpu = vm.fd.create_vcpu(id as u64).map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
    if !vm.tsc_default_set {
        assert_host_tsc_rate(&vcpu, id);
    }
    let mut cpuid: CpuId = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    cpuid::filter(&mut cpuid, id, nr);
    vcpu.set_cpuid2(&cpuid).map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
    preset_xcr0(&vcpu, &cpuid, id);
    set_msrs(&vcpu)?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| Error::kvm("KVM_SET_FPU", e))?;
    set_lint(&vcpu)?;
    if let Some(rip) = entry {
        set_boot_sregs(&vcpu, mem)?;
        let regs = kvm_regs {
            rflags: 0x2,
            rip,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: layout::ZERO_PAGE_START,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
    }
    Ok(vcpu)
}

/// Where the VM-wide default could not be set (`vm::default_tsc_to_host_rate`, kernels
/// before 6.0): sets the new vCPU's TSC rate to the host kernel's current TSC frequency
/// (`KVM_SET_TSC_KHZ` with 0 means exactly that), before anything reads or writes its TSC.
fn assert_host_tsc_rate(vcpu: &VcpuFd, id: u8) {
    let default = vcpu.get_tsc_khz().ok();
    if let Err(e) = vcpu.set_tsc_khz(0) {
        tracing::warn!("vCPU {id}: KVM_SET_TSC_KHZ to the host's rate: {e}; its saved TSC may be wrong");
        return;
    }
    let host = vcpu.get_tsc_khz().ok();
    if default != host {
        tracing::info!("vCPU {id}: TSC rate set to the host's {host:?} kHz (KVM's default was {default:?} kHz)");
    }
}

/// The XCR0 a guest that enables every user state component in CPUID leaf 0xD ends up with.
pub(crate) fn full_xcr0(cpuid: &CpuId) -> Option<u64> {
    let leaf = cpuid.as_slice().iter().find(|e| e.function == 0xd && e.index == 0)?;
    let xcr0 = u64::from(leaf.eax) | u64::from(leaf.edx) << 32;
    (xcr0 & 0b11 == 0b11).then_some(xcr0)
}

/// Starts the vCPU with XCR0 already holding every state component the guest may enable,
/// instead of the reset value (x87 only). A guest sets XCR0 itself with XSETBV, which KVM
/// intercepts; but under QEMU TCG's emulated AMD-V (the nested test set-up) KVM evidently
/// does not see it: CPUID 0xD's save-area size, which KVM derives from its XCR0, stayed at
/// 576 bytes (x87 and SSE) while the guest had enabled AVX (832), and Linux warned "XSAVE
/// consistency problem: size 832 != kernel_size 576" on every boot (a WARN splat). KVM also
/// loads its XCR0 on VM entry. With the value preset both agree and the warning is gone
/// (guest check `nowarn`); on real hardware the guest's own XSETBV still wins.
fn preset_xcr0(vcpu: &VcpuFd, cpuid: &CpuId, id: u8) {
    let Some(xcr0) = full_xcr0(cpuid) else { return };
    let mut xcrs = kvm_bindings::kvm_xcrs { nr_xcrs: 1, ..Default::default() };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    if let Err(e) = vcpu.set_xcrs(&xcrs) {
        tracing::warn!("vCPU {id}: KVM_SET_XCRS (XCR0 {xcr0:#x}): {e}; the guest sets XCR0 itself");
    }
}

fn set_msrs(vcpu: &VcpuFd) -> Result<()> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    let entries = [
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, 1), // fast string operations
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Vcpu { cpu: 0, reason: format!("MSR list: {e:?}") })?;
    let n = vcpu.set_msrs(&msrs).map_err(|e| Error::kvm("KVM_SET_MSRS", e))?;
    if n != entries.len() {
        return Err(Error::Vcpu {
            cpu: 0,
            reason: format!("KVM accepted {n} of {} boot MSRs (first refused: {:#x})", entries.len(), entries[n].index),
        });
    }
    Ok(())
}

/// LINT0 = ExtINT (the 8259 in virtual-wire mode), LINT1 = NMI, as firmware leaves them.
fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_NMI: u32 = 4;
    const MODE_EXTINT: u32 = 7;
    let mut lapic = vcpu.get_lapic().map_err(|e| Error::kvm("KVM_GET_LAPIC", e))?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|e| Error::kvm("KVM_SET_LAPIC", e))
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

fn segment(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index as u16 * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: (present == 0) as u8,
    }
}

/// Long mode with an identity map of the first GiB (2 MiB pages), a flat 64-bit code
/// segment and a data segment, as the 64-bit boot protocol asks.
fn set_boot_sregs(vcpu: &VcpuFd, mem: &GuestMemory) -> Result<()> {
    let wr = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a)).map_err(|e| Error::Memory(format!("boot tables at {a:#x}: {e}")))
    };
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        wr(*e, layout::GDT_START + i as u64 * 8)?;
    }
    wr(0, layout::IDT_START)?;
    wr(layout::PDPTE_START | 0x3, layout::PML4_START)?;
    wr(layout::PDE_START | 0x3, layout::PDPTE_START)?;
    for i in 0..512u64 {
        wr((i << 21) | 0x83, layout::PDE_START + i * 8)?;
    }

    let mut s = vcpu.get_sregs().map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
    s.gdt.base = layout::GDT_START;
    s.gdt.limit = (gdt.len() * 8 - 1) as u16;
    s.idt.base = layout::IDT_START;
    s.idt.limit = 7;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(gdt[3], 3);
    s.cr3 = layout::PML4_START;
    s.cr4 |= 1 << 5; // PAE
    s.cr0 |= 1 | (1 << 31); // PE, PG
    s.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&s).map_err(|e| Error::kvm("KVM_SET_SREGS", e))
}

/// Signal used to kick a vCPU thread out of KVM_RUN (pause, stop).
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

pub fn install_kick_handler() -> Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
        .map_err(|e| Error::io("installing the vCPU kick signal handler", e.into()))
}

/// A vCPU as the VMM shares it: its thread holds the lock while in KVM_RUN, the snapshot
/// writer takes it while the thread is parked.
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

fn lock(v: &SharedVcpu) -> std::sync::MutexGuard<'_, VcpuFd> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

/// The vCPU thread body. Returns when the VM stops.
pub fn run(shared: SharedVcpu, id: usize, ctx: VcpuContext) {
    let fail = |reason: String| ctx.lifecycle.request(ExitReason::Failed(format!("vCPU {id}: {reason}")));
    loop {
        if ctx.control.is_paused() {
            complete_pending_io(&mut lock(&shared));
        }
        if !ctx.control.checkpoint() {
            break;
        }
        let mut vcpu = lock(&shared);
        let exit = vcpu.run();
        ctx.exits[id].fetch_add(1, Ordering::Relaxed);
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(port as u64, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(port as u64, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel LAPIC; keep the thread from spinning.
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(VcpuExit::Shutdown) => {
                // Where the guest was: with no exit before it, the guest died in its
                // decompressor or earliest kernel code (no port I/O yet).
                // (The shutdown itself was counted already.)
                let exits = ctx.exits[id].load(Ordering::Relaxed).saturating_sub(1);
                tracing::warn!("vCPU {id}: triple fault after {exits} exits; {}", shutdown_state(&vcpu));
                ctx.lifecycle.request(ExitReason::Reboot("triple fault"))
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => ctx.lifecycle.request(ExitReason::PowerOff),
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                ctx.lifecycle.request(ExitReason::Reboot("system reset"))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                fail(format!("KVM entry failed: hardware reason {reason:#x} on host cpu {cpu}"))
            }
            Ok(VcpuExit::InternalError) => fail("KVM internal error (emulation failure)".into()),
            Ok(VcpuExit::Intr) => {}
            Ok(other) => fail(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => fail(format!("KVM_RUN: {e}")),
        }
        drop(vcpu);
        if ctx.lifecycle.current().is_some() {
            break;
        }
    }
}

/// Requests for reading a vCPU's registers, to check them against the seccomp allowlist.
#[allow(non_snake_case)]
mod request {
    use kvm_bindings::{kvm_regs, kvm_sregs};
    const KVMIO: u32 = 0xAE;
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
}

/// The vCPU's registers as KVM reports them after a triple fault, for the log. On AMD, KVM
/// re-INITs the vCPU on a SHUTDOWN intercept (the VMCB is undefined after it), so what is
/// read there is the reset state (RIP 0xfff0), which says so rather than where the guest died.
fn shutdown_state(vcpu: &VcpuFd) -> String {
    // After isolation an ioctl outside the allowlist kills the VMM (exit 31), which would
    // turn a guest reboot into a VMM failure: read only what the filter lets through.
    let allowed = crate::isolation::allowed_ioctls();
    let permitted = |req: u64| allowed.iter().any(|(r, _)| u64::from(*r) == req);
    if !permitted(request::KVM_GET_REGS() as u64) || !permitted(request::KVM_GET_SREGS() as u64) {
        return "registers not read (KVM_GET_REGS/KVM_GET_SREGS are not in the seccomp allowlist)".into();
    }
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return format!("registers unreadable: {e}"),
    };
    let s = match vcpu.get_sregs() {
        Ok(s) => s,
        Err(e) => return format!("rip={:#x}, sregs unreadable: {e}", regs.rip),
    };
    let reset = regs.rip == 0xfff0 && s.cs.base == 0xffff_0000;
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} \
         gdt={:#x}/{:#x} idt={:#x}/{:#x}{}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        s.cs.selector,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.gdt.base,
        s.gdt.limit,
        s.idt.base,
        s.idt.limit,
        if reset { " (reset state: KVM re-INITs the vCPU on shutdown, the faulting state is lost)" } else { "" }
    )
}

/// KVM finishes an I/O or MMIO read that user space answered only on the next KVM_RUN (it
/// writes the register and moves RIP then). A vCPU about to park enters once with
/// immediate_exit set, so that its saved registers never miss an instruction's result.
fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        Ok(VcpuExit::Intr) => {}
        other => tracing::warn!("completing pending I/O before pause: {other:?}"),
    }
    vcpu.set_kvm_immediate_exit(0);
}

/// MSRs that must come in a fixed order within KVM_SET_MSRS: the TSC first (the deadline
/// timer and kvmclock are relative to it), the TSC deadline last.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

const MSR_IA32_XSS: u32 = 0xda0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// MSRs KVM saves and restores but leaves out of KVM_GET_MSR_INDEX_LIST (QEMU saves them
/// the same way): the MTRRs (fixed ranges and KVM's 8 variable pairs), which firmware such
/// as OVMF programs. Plus IA32_XSS (the XSAVES supervisor state) and the TSC deadline, in
/// case a KVM does not list them: losing either loses guest state (a 0 deadline is a timer
/// that never fires). Ones this vCPU cannot read are dropped like listed ones.
fn unlisted_msrs() -> impl Iterator<Item = u32> {
    [MSR_MTRR_DEF_TYPE, 0x250, 0x258, 0x259].into_iter().chain(0x268..=0x26f).chain(0x200..=0x20f).chain([MSR_IA32_XSS, MSR_IA32_TSC_DEADLINE])
}

/// The MSRs to try to save, from KVM's list: each once, the TSC first, the deadline last.
pub fn msr_candidates(listed: &[u32]) -> Vec<u32> {
    let mut indices: Vec<u32> = listed.iter().copied().chain(unlisted_msrs()).collect();
    indices.sort_unstable();
    indices.dedup();
    indices.sort_by_key(|i| match *i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    indices
}

/// The MSRs worth saving: KVM's KVM_GET_MSR_INDEX_LIST (what it can save and restore) and
/// [`unlisted_msrs`], minus those this vCPU refuses to read (features the CPU model lacks).
/// Called at set-up, before isolation: the snapshot writer cannot ask /dev/kvm later.
pub fn saveable_msrs(vm: &Vm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = vm.kvm.get_msr_index_list().map_err(|e| Error::kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    let mut indices = msr_candidates(list.as_slice());
    loop {
        let mut msrs = msr_buffer(&indices)?;
        let n = vcpu.get_msrs(&mut msrs).map_err(|e| Error::kvm("KVM_GET_MSRS", e))?;
        if n >= indices.len() {
            return Ok(indices);
        }
        // KVM stops at the first MSR it cannot read.
        tracing::debug!("MSR {:#x} is not readable on this vCPU; not saved", indices[n]);
        indices.remove(n);
    }
}

fn msr_buffer(indices: &[u32]) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    Msrs::from_entries(&entries).map_err(|e| Error::Vcpu { cpu: 0, reason: format!("MSR list: {e:?}") })
}

/// One MSR as saved: readable in state.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// Legacy FPU state (KVM_GET_FPU). kvm-bindings has no serde for `kvm_fpu`, so it is
/// mirrored field by field.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> std::result::Result<kvm_fpu, String> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != f.fpr.len() || self.xmm.len() != f.xmm.len() {
            return Err(format!("fpu: {} fpr and {} xmm registers, expected 8 and 16", self.fpr.len(), self.xmm.len()));
        }
        f.fpr.copy_from_slice(&self.fpr);
        f.xmm.copy_from_slice(&self.xmm);
        Ok(f)
    }
}

/// Everything KVM holds about one vCPU. Field order is restore order (see [`restore_state`]).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub sregs: kvm_sregs,
    pub regs: kvm_regs,
    pub fpu: FpuState,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrValue>,
    pub vcpu_events: kvm_vcpu_events,
    /// For information and a same-host check; the TSC itself is the IA32_TSC MSR.
    pub tsc_khz: Option<u32>,
    /// The CPUID the guest was given: a restore compares it with what this host gives now.
    pub cpuid: Vec<crate::cpuid::CpuidEntry>,
}

/// Reads the state of a parked vCPU (its thread does not hold the lock while parked).
pub fn save_state(vcpu: &SharedVcpu, id: u8, msr_indices: &[u32]) -> Result<VcpuState> {
    let v = lock(vcpu);
    let cpu = usize::from(id);
    let k = |op: &'static str| move |e| Error::Vcpu { cpu, reason: format!("{op}: {e}") };
    let mp_state = v.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?;
    let regs = v.get_regs().map_err(k("KVM_GET_REGS"))?;
    let sregs = v.get_sregs().map_err(k("KVM_GET_SREGS"))?;
    let fpu = v.get_fpu().map_err(k("KVM_GET_FPU"))?;
    let xsave = v.get_xsave().map_err(k("KVM_GET_XSAVE"))?;
    let xcrs = v.get_xcrs().map_err(k("KVM_GET_XCRS"))?;
    let debugregs = v.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?;
    let lapic = v.get_lapic().map_err(k("KVM_GET_LAPIC"))?;
    let mut msrs = msr_buffer(msr_indices)?;
    let n = v.get_msrs(&mut msrs).map_err(k("KVM_GET_MSRS"))?;
    if n != msr_indices.len() {
        return Err(Error::Vcpu {
            cpu,
            reason: format!("KVM_GET_MSRS read {n} of {} MSRs (stopped at {:#x})", msr_indices.len(), msr_indices[n]),
        });
    }
    let msrs = msrs.as_slice().iter().map(|e| MsrValue { index: e.index, data: e.data }).collect();
    let vcpu_events = v.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?;
    let tsc_khz = v.get_tsc_khz().ok();
    let cpuid = crate::cpuid::entries(&v.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(k("KVM_GET_CPUID2"))?);
    Ok(VcpuState { id, mp_state, sregs, regs, fpu: FpuState::from(&fpu), xsave, xcrs, debugregs, lapic, msrs, vcpu_events, tsc_khz, cpuid })
}

/// Puts a saved state into a freshly created vCPU (CPUID already set), before it runs.
/// Order matters: sregs (mode, EFER, APIC base) before regs and the LAPIC; MSRs after the
/// LAPIC (the TSC deadline arms its timer); pending events last.
/// What a restore does about the TSC frequency the snapshot's vCPU ran at.
#[derive(Debug, PartialEq)]
pub enum TscPlan {
    /// The same (within KVM's own tolerance, 250 ppm).
    Same,
    /// Apart by more than KVM's tolerance but less than [`RECALIBRATED_PPM`]: the same
    /// machine, whose kernel calibrated its TSC a little differently at this boot (it moves by
    /// hundreds of ppm between boots on machines without a CPUID crystal frequency, more
    /// under emulation). Refusing would throw away the user's session for a clock-rate
    /// difference of under 1%: the guest goes on, its TSC scaled back to the old rate where
    /// the CPU can (KVM_SET_TSC_KHZ with KVM_CAP_TSC_CONTROL). Where it cannot, only a guest
    /// clocksource reading the raw TSC runs off by that much (kvmclock, which KVM derives
    /// from the host's own calibration, stays exact), and the agent sets the guest's wall
    /// clock after the resume anyway.
    Recalibrated { saved: u32, now: u32 },
    /// Further apart: another machine (or a CPU running at another nominal frequency). The
    /// restore is refused: the guest's own calibration (its delay loops, its clocksource's
    /// mult) would be wrong by more than a clock can be trusted with.
    Differs { saved: u32, now: u32 },
    /// One side is unknown (KVM did not tell): nothing to compare, said in the log.
    Unknown,
}

/// KVM's own tolerance for "the same TSC frequency" (its `tsc_tolerance_ppm`).
pub const SAME_PPM: u64 = 250;
/// The most a TSC frequency moves between two calibrations of one machine; beyond it, the
/// state comes from another machine.
pub const RECALIBRATED_PPM: u64 = 10_000;

pub fn tsc_plan(saved: Option<u32>, now: Option<u32>) -> TscPlan {
    let (Some(saved), Some(now)) = (saved, now) else { return TscPlan::Unknown };
    let ppm = u64::from(saved.abs_diff(now)) * 1_000_000 / u64::from(now.max(1));
    match ppm {
        p if p <= SAME_PPM => TscPlan::Same,
        p if p <= RECALIBRATED_PPM => TscPlan::Recalibrated { saved, now },
        _ => TscPlan::Differs { saved, now },
    }
}

/// KVM_KVMCLOCK_CTRL on every vCPU that is not running: the guest's next kvmclock update
/// carries PVCLOCK_GUEST_STOPPED, so its watchdogs (soft lockup, RCU stall) do not take the
/// time it spent paused or saved for a hang. Called before parked vCPUs run again. A vCPU
/// whose guest has no kvmclock (yet) answers EINVAL: nothing to tell it.
pub fn tell_guest_it_was_paused(vcpus: &[SharedVcpu]) {
    for (id, v) in vcpus.iter().enumerate() {
        // A vCPU still in KVM_RUN holds its lock and was never stopped: skip it.
        let Ok(v) = v.try_lock() else { continue };
        match v.kvmclock_ctrl() {
            Ok(()) => {}
            Err(e) if e.errno() == libc::EINVAL => {}
            Err(e) => tracing::warn!("vCPU {id}: KVM_KVMCLOCK_CTRL: {e}; the guest may report a soft lockup"),
        }
    }
}

/// Checks the new vCPU's TSC frequency against the saved one ([`tsc_plan`]): the same, or
/// recalibrated (then scaled back to the saved rate when `scaling`, KVM_CAP_TSC_CONTROL, is
/// there; else the guest goes on at the new rate, said in the log); further apart, the
/// restore is refused ([`Error::StateRejected`] on `state_file`), saying both frequencies.
pub fn match_tsc(vcpu: &SharedVcpu, s: &VcpuState, scaling: bool, state_file: &std::path::Path) -> Result<()> {
    let v = lock(vcpu);
    let cpu = usize::from(s.id);
    match tsc_plan(s.tsc_khz, v.get_tsc_khz().ok()) {
        TscPlan::Same => Ok(()),
        TscPlan::Unknown => {
            tracing::warn!("vCPU {cpu}: TSC frequency saved {:?} kHz, KVM reports none now: not compared", s.tsc_khz);
            Ok(())
        }
        TscPlan::Recalibrated { saved, now } => {
            let ppm = (i64::from(now) - i64::from(saved)) * 1_000_000 / i64::from(saved);
            // Without TSC scaling KVM_SET_TSC_KHZ would put a faster rate into "catch-up"
            // mode (the guest's TSC jumps forward at every entry): not asked for then.
            match scaling.then(|| v.set_tsc_khz(saved)) {
                Some(Ok(())) => tracing::info!("vCPU {cpu}: TSC kept at the saved {saved} kHz by KVM's TSC scaling (this host calibrated {now} kHz, {ppm:+} ppm)"),
                Some(Err(e)) => tracing::warn!("vCPU {cpu}: KVM_SET_TSC_KHZ {saved}: {e}; the guest's TSC runs at this host's {now} kHz ({ppm:+} ppm)"),
                None => tracing::warn!("vCPU {cpu}: this host's TSC was calibrated at {now} kHz, the guest's ran at {saved} kHz ({ppm:+} ppm) and KVM cannot scale it: resumed at the new rate"),
            }
            Ok(())
        }
        TscPlan::Differs { saved, now } => Err(Error::StateRejected {
            file: state_file.to_path_buf(),
            field: format!("vcpus[{cpu}].tsc_khz"),
            reason: format!(
                "the guest's TSC ran at {saved} kHz, this host's runs at {now} kHz (more than {RECALIBRATED_PPM} ppm apart: another machine)"
            ),
        }),
    }
}

pub fn restore_state(vcpu: &SharedVcpu, s: &VcpuState) -> Result<()> {
    let v = lock(vcpu);
    let cpu = usize::from(s.id);
    let k = |op: &'static str| move |e| Error::Vcpu { cpu, reason: format!("{op}: {e}") };
    v.set_mp_state(s.mp_state).map_err(k("KVM_SET_MP_STATE"))?;
    v.set_sregs(&s.sregs).map_err(k("KVM_SET_SREGS"))?;
    v.set_regs(&s.regs).map_err(k("KVM_SET_REGS"))?;
    let fpu = s.fpu.to_kvm().map_err(|reason| Error::Vcpu { cpu, reason })?;
    v.set_fpu(&fpu).map_err(k("KVM_SET_FPU"))?;
    // SAFETY: `kvm_xsave` is the legacy 4 KiB layout KVM_GET_XSAVE produced; nothing of
    // KVM_GET_XSAVE2's larger buffer (AMX) was saved, so none is read past it.
    unsafe { v.set_xsave(&s.xsave) }.map_err(k("KVM_SET_XSAVE"))?;
    v.set_xcrs(&s.xcrs).map_err(k("KVM_SET_XCRS"))?;
    v.set_debug_regs(&s.debugregs).map_err(k("KVM_SET_DEBUGREGS"))?;
    v.set_lapic(&s.lapic).map_err(k("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> =
        s.msrs.iter().map(|m| kvm_msr_entry { index: m.index, data: m.data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Vcpu { cpu, reason: format!("MSR list: {e:?}") })?;
    let n = v.set_msrs(&msrs).map_err(k("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(Error::Vcpu {
            cpu,
            reason: format!("KVM_SET_MSRS took {n} of {} MSRs (refused {:#x})", entries.len(), entries[n].index),
        });
    }
    v.set_vcpu_events(&s.vcpu_events).map_err(k("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Pause all vCPUs: ask, then kick until every thread is parked (or `timeout` passes).
pub fn pause_all(control: &RunControl, threads: &[std::thread::JoinHandle<()>], timeout: Duration) -> bool {
    control.set_paused(true);
    let start = Instant::now();
    while control.parked() < threads.len() {
        if start.elapsed() > timeout {
            return false;
        }
        kick_all(threads);
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

pub fn kick_all(threads: &[std::thread::JoinHandle<()>]) {
    use std::os::unix::thread::JoinHandleExt;
    for t in threads {
        if !t.is_finished() {
            // SAFETY: the pthread is alive (not finished, and we hold its JoinHandle);
            // the kick signal has a no-op handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a snapshot saves of the MSRs KVM lists (a few of a real host's list here), pinned:
    /// every listed one, the MTRRs KVM does not list, IA32_XSS and the TSC deadline even
    /// when unlisted; the TSC first and the deadline last (KVM_SET_MSRS applies them in order,
    /// and the deadline is relative to the TSC).
    #[test]
    fn the_saved_msrs_are_pinned() {
        let listed = [0xc000_0082, MSR_IA32_TSC_DEADLINE, 0x4b56_4d01, 0x4b56_4d00, 0x3b, 0x277, 0x174, MSR_IA32_TSC, 0xc000_0103, 0x4b56_4d02];
        let got = msr_candidates(&listed);
        let mut want = vec![MSR_IA32_TSC, 0x3b, 0x174];
        want.extend((0x200..=0x20f).chain([0x250, 0x258, 0x259]).chain(0x268..=0x26f));
        want.extend([0x277, MSR_MTRR_DEF_TYPE, MSR_IA32_XSS, 0x4b56_4d00, 0x4b56_4d01, 0x4b56_4d02, 0xc000_0082, 0xc000_0103, MSR_IA32_TSC_DEADLINE]);
        assert_eq!(got, want);
        // Unlisted, the XSS and the deadline are still tried (once each).
        let got = msr_candidates(&[MSR_IA32_TSC]);
        assert_eq!(got.iter().filter(|i| **i == MSR_IA32_XSS).count(), 1);
        assert_eq!((got[0], *got.last().unwrap()), (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE));
    }

    #[test]
    fn xcr0_preset_is_leaf_0xd_when_it_has_x87_and_sse() {
        let leaf = |eax, edx| kvm_bindings::kvm_cpuid_entry2 { function: 0xd, index: 0, eax, edx, ..Default::default() };
        let sub1 = kvm_bindings::kvm_cpuid_entry2 { function: 0xd, index: 1, eax: 0xf, ..Default::default() };
        let c = CpuId::from_entries(&[sub1, leaf(0x7, 0)]).unwrap();
        assert_eq!(full_xcr0(&c), Some(0x7));
        let c = CpuId::from_entries(&[leaf(0x2e7, 0x1)]).unwrap();
        assert_eq!(full_xcr0(&c), Some(0x1_0000_02e7));
        // No XSAVE leaf, or one without SSE: leave XCR0 at its reset value.
        assert_eq!(full_xcr0(&CpuId::from_entries(&[sub1]).unwrap()), None);
        assert_eq!(full_xcr0(&CpuId::from_entries(&[leaf(0x1, 0)]).unwrap()), None);
    }

    #[test]
    fn tsc_frequencies_are_compared_within_kvms_tolerance() {
        assert_eq!(tsc_plan(Some(2_000_000), Some(2_000_000)), TscPlan::Same);
        assert_eq!(tsc_plan(Some(2_000_400), Some(2_000_000)), TscPlan::Same, "200 ppm");
        // Two boots of one machine under emulation, as measured: 670 ppm apart.
        assert_eq!(tsc_plan(Some(2_594_157), Some(2_595_900)), TscPlan::Recalibrated { saved: 2_594_157, now: 2_595_900 });
        assert_eq!(tsc_plan(Some(2_001_000), Some(2_000_000)), TscPlan::Recalibrated { saved: 2_001_000, now: 2_000_000 });
        assert_eq!(tsc_plan(Some(2_020_000), Some(2_000_000)), TscPlan::Recalibrated { saved: 2_020_000, now: 2_000_000 }, "1%");
        assert_eq!(tsc_plan(Some(2_030_000), Some(2_000_000)), TscPlan::Differs { saved: 2_030_000, now: 2_000_000 }, "1.5%");
        assert_eq!(tsc_plan(Some(3_000_000), Some(2_000_000)), TscPlan::Differs { saved: 3_000_000, now: 2_000_000 });
        assert_eq!(tsc_plan(None, Some(2_000_000)), TscPlan::Unknown);
        assert_eq!(tsc_plan(Some(2_000_000), None), TscPlan::Unknown);
    }

    #[test]
    fn gdt_segments_round_trip() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.selector, code.l, code.present, code.type_), (8, 1, 1, 0xb));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.db, data.l, data.type_), (16, 1, 0, 3));
        let null = segment(gdt_entry(0, 0, 0), 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn register_requests_are_the_kernels() {
        // include/uapi/linux/kvm.h: _IOR(KVMIO, 0x81, struct kvm_regs), _IOR(KVMIO, 0x83, struct kvm_sregs).
        assert_eq!(request::KVM_GET_REGS() as u64, 0x8090_ae81);
        assert_eq!(request::KVM_GET_SREGS() as u64, 0x8138_ae83);
    }

    #[test]
    fn pause_parks_and_resume_releases() {
        let c = Arc::new(RunControl::default());
        c.set_paused(true);
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.checkpoint());
        while c.parked() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        c.set_paused(false);
        assert!(t.join().unwrap());
        c.stop();
        assert!(!c.checkpoint());
    }
}
