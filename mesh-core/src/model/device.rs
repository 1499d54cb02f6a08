//! Where a span or a client head computes: the CPU or one NVIDIA GPU.
//!
//! A provider names a device (`--device cuda:0`, or `device = "cuda:0"` in node.toml).
//! A build without the `cuda` feature, or a machine without a usable GPU, falls back to
//! the CPU with a message that says why, so one config works on every machine.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// A device as the user names it: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this names a GPU.
    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("{s:?}: expected cpu, cuda or cuda:N")),
        }
    }
}

/// The device a span or head will run on, and what to tell the provider about it.
#[derive(Clone, Debug)]
pub struct SelectedDevice {
    pub device: Device,
    /// What was asked for.
    pub asked: DeviceSpec,
    /// One line for the log: the GPU's name and memory, or why the CPU was taken.
    pub description: String,
    /// True when a GPU was asked for and the CPU is used instead.
    pub fell_back: bool,
}

impl SelectedDevice {
    fn cpu(asked: DeviceSpec, description: String) -> Self {
        Self {
            fell_back: asked.is_cuda(),
            device: Device::Cpu,
            asked,
            description,
        }
    }
}

/// Open the device `spec` names, or the CPU with the reason when it cannot be used.
pub fn select(spec: DeviceSpec) -> SelectedDevice {
    match spec {
        DeviceSpec::Cpu => SelectedDevice::cpu(spec, "cpu".into()),
        DeviceSpec::Cuda(ordinal) => match open_cuda(ordinal) {
            Ok((device, description)) => SelectedDevice {
                device,
                asked: spec,
                description,
                fell_back: false,
            },
            Err(why) => SelectedDevice::cpu(spec, format!("cpu ({spec} unavailable: {why})")),
        },
    }
}

/// Free and total bytes of a GPU's memory as its driver reports them now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VramInfo {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Free and total memory of the GPU behind `device`; `None` for the CPU.
pub fn vram(device: &Device) -> Option<VramInfo> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda_vram(cuda).ok();
    }
    let _ = device;
    None
}

#[cfg(feature = "cuda")]
fn cuda_vram(cuda: &candle_core::CudaDevice) -> Result<VramInfo, String> {
    let stream = cuda.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(|e| e.to_string())?;
    let (free, total) = ctx.mem_get_info().map_err(|e| e.to_string())?;
    Ok(VramInfo {
        free_bytes: free as u64,
        total_bytes: total as u64,
    })
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<(Device, String), String> {
    // candle panics inside cudarc when the driver library is missing; catch that and
    // report it as the reason, since a provider's machine may simply have no driver.
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal))
        .map_err(|_| "the CUDA driver (libcuda.so.1) could not be loaded".to_string())?;
    // candle appends a backtrace to its errors when RUST_BACKTRACE is set: keep the cause.
    let device = opened.map_err(|e| first_line(&e.to_string()))?;
    let Device::Cuda(cuda) = &device else {
        return Err("candle returned a non-CUDA device".into());
    };
    let name = cuda
        .cuda_stream()
        .context()
        .name()
        .unwrap_or_else(|_| "unnamed GPU".into());
    let memory = cuda_vram(cuda)
        .map(|v| {
            format!(
                ", {:.1} of {:.1} GiB free",
                v.free_bytes as f64 / GIB,
                v.total_bytes as f64 / GIB
            )
        })
        .unwrap_or_default();
    Ok((device, format!("cuda:{ordinal} ({name}{memory})")))
}

#[cfg(feature = "cuda")]
const GIB: f64 = (1u64 << 30) as f64;

#[cfg(feature = "cuda")]
fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().trim().to_string()
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<(Device, String), String> {
    Err("this binary was built without the `cuda` feature; rebuild with --features cuda".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("CUDA", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>(), Ok(spec));
        }
        assert_eq!(
            DeviceSpec::Cuda(2).to_string().parse(),
            Ok(DeviceSpec::Cuda(2))
        );
        for bad in ["", "cuda:", "cuda:x", "metal", "cuda:-1"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
        }
    }

    #[test]
    fn the_cpu_is_always_there_and_a_missing_gpu_falls_back_with_a_reason() {
        let cpu = select(DeviceSpec::Cpu);
        assert!(cpu.device.is_cpu() && !cpu.fell_back);
        assert!(vram(&cpu.device).is_none());
        // Out of range on any machine: the fallback must name the reason.
        let missing = select(DeviceSpec::Cuda(4096));
        assert!(missing.device.is_cpu() && missing.fell_back);
        assert!(
            missing.description.contains("cuda:4096 unavailable"),
            "{}",
            missing.description
        );
    }
}
