// The XLA FFI handler of the decode step: included last by each kernel's .cu, after its
// decode_step_kernel, SMEM_BYTES, WS_FLOATS and WS_BEST.
//
// Its first result chooses what a launch does: float32 [B, V] logits, one step; or int32
// [B, N] tokens, N greedy steps, each fed the previous one's arg-max.

#pragma once

static ffi::Error DecodeStepImpl(cudaStream_t stream, ffi::AnyBuffer tokens, ffi::AnyBuffer time,
                                 ffi::AnyBuffer starts, ffi::AnyBuffer inv_freq, ffi::AnyBuffer embed,
                                 ffi::AnyBuffer attn_norm, ffi::AnyBuffer wqkv, ffi::AnyBuffer wo,
                                 ffi::AnyBuffer mlp_norm, ffi::AnyBuffer wgu, ffi::AnyBuffer wdown,
                                 ffi::AnyBuffer final_norm, ffi::RemainingArgs caches,
                                 ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> workspace,
                                 ffi::RemainingRets caches_out, ffi::Span<const int64_t> windows, float eps,
                                 float embed_scale, float attn_scale, float logit_cap, int32_t eos) {
  if (caches_out.size() != 2 * L || windows.size() != L)
    return ffi::Error::InvalidArgument("decode_step: expected the keys and values of every layer");
  const auto out_dims = out->dimensions();
  const bool greedy = out->element_type() == ffi::DataType::S32;
  if (out_dims.size() != 2 || out_dims[0] != B || (greedy ? out_dims[1] < 1 : out_dims[1] != V ||
                                                   out->element_type() != ffi::DataType::F32))
    return ffi::Error::InvalidArgument("decode_step: the result must be float32 [B, V] logits or int32 [B, steps]");
  Params p;
  p.steps = greedy ? static_cast<int>(out_dims[1]) : 1;
  p.logits = greedy ? nullptr : static_cast<float*>(out->untyped_data());
  p.greedy_tokens = greedy ? static_cast<int32_t*>(out->untyped_data()) : nullptr;
  p.eos = eos;
  p.tokens = static_cast<const int32_t*>(tokens.untyped_data());
  p.time = static_cast<const int32_t*>(time.untyped_data());
  p.starts = static_cast<const int32_t*>(starts.untyped_data());
  p.inv_freq = static_cast<const float*>(inv_freq.untyped_data());
  p.embed = static_cast<const T*>(embed.untyped_data());
  p.attn_norm = static_cast<const float*>(attn_norm.untyped_data());
  p.wqkv = static_cast<const T*>(wqkv.untyped_data());
  p.wo = static_cast<const T*>(wo.untyped_data());
  p.mlp_norm = static_cast<const float*>(mlp_norm.untyped_data());
  p.wgu = static_cast<const T*>(wgu.untyped_data());
  p.wdown = static_cast<const T*>(wdown.untyped_data());
  p.final_norm = static_cast<const float*>(final_norm.untyped_data());
  for (int l = 0; l < L; ++l) {   // the outputs alias the inputs: the caches are updated in place
    auto keys = caches_out.get<ffi::AnyBuffer>(l);
    auto values = caches_out.get<ffi::AnyBuffer>(L + l);
    if (keys.has_error()) return keys.error();
    if (values.has_error()) return values.error();
    p.k_cache[l] = static_cast<T*>((*keys)->untyped_data());
    p.v_cache[l] = static_cast<T*>((*values)->untyped_data());
    p.cache_size[l] = static_cast<int>((*keys)->dimensions()[2]);
    p.window[l] = static_cast<int>(windows[l]);
  }
  p.ws = static_cast<float*>(workspace->untyped_data());
  p.best = reinterpret_cast<unsigned long long*>(p.ws + WS_BEST);
  p.eps = eps, p.embed_scale = embed_scale, p.attn_scale = attn_scale, p.logit_cap = logit_cap;

  static const cudaError_t configured = cudaFuncSetAttribute(
      decode_step_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
  if (configured != cudaSuccess) return ffi::Error::Internal(cudaGetErrorString(configured));
  void* args[] = {&p};
  const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(decode_step_kernel), NB, THREADS,
                                                      args, SMEM_BYTES, stream);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("decode_step launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmDecodeStep, DecodeStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()   // tokens
                                  .Arg<ffi::AnyBuffer>()   // time
                                  .Arg<ffi::AnyBuffer>()   // starts
                                  .Arg<ffi::AnyBuffer>()   // inv_freq
                                  .Arg<ffi::AnyBuffer>()   // embed
                                  .Arg<ffi::AnyBuffer>()   // attn_norm
                                  .Arg<ffi::AnyBuffer>()   // wqkv
                                  .Arg<ffi::AnyBuffer>()   // wo
                                  .Arg<ffi::AnyBuffer>()   // mlp_norm
                                  .Arg<ffi::AnyBuffer>()   // wgu
                                  .Arg<ffi::AnyBuffer>()   // wdown
                                  .Arg<ffi::AnyBuffer>()   // final_norm
                                  .RemainingArgs()         // keys of every layer, then values
                                  .Ret<ffi::AnyBuffer>()   // logits, or greedy tokens
                                  .Ret<ffi::AnyBuffer>()   // workspace
                                  .RemainingRets()         // the caches, aliased to the inputs
                                  .Attr<ffi::Span<const int64_t>>("windows")
                                  .Attr<float>("eps")
                                  .Attr<float>("embed_scale")
                                  .Attr<float>("attn_scale")
                                  .Attr<float>("logit_cap")
                                  .Attr<int32_t>("eos"));

// The workspace's size, for the Python side to allocate it.
extern "C" int jaxlm_workspace_floats() { return WS_FLOATS; }
