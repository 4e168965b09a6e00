"""The look: a calm indigo theme on system fonts (nothing is fetched from font CDNs: the UI works offline)."""
from __future__ import annotations

import gradio as gr

SANS = [gr.themes.Font("Inter"), gr.themes.Font("ui-sans-serif"), gr.themes.Font("system-ui"),
        gr.themes.Font("Segoe UI"), gr.themes.Font("Helvetica Neue"), gr.themes.Font("sans-serif")]
MONO = [gr.themes.Font("ui-monospace"), gr.themes.Font("SFMono-Regular"), gr.themes.Font("Menlo"),
        gr.themes.Font("Consolas"), gr.themes.Font("monospace")]


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate", font=SANS,
                          font_mono=MONO, radius_size="md").set(
        # Plain labels instead of the Soft theme's tinted chips: a form with 20 fields reads calmer.
        block_title_background_fill="transparent",
        block_title_background_fill_dark="transparent",
        block_title_text_color="*neutral_800",
        block_title_text_color_dark="*neutral_100",
        block_title_padding="0",
        block_title_text_size="*text_sm",
        block_label_background_fill="*background_fill_primary",
        block_label_background_fill_dark="*background_fill_primary",
        block_label_text_color="*neutral_600",
        block_label_text_color_dark="*neutral_300",
        block_label_text_size="*text_sm",
        block_label_padding="*spacing_xs *spacing_sm",
        button_large_text_weight="600",
    )


CSS = """
.gradio-container { width: 100% !important; max-width: 1560px !important; margin: 0 auto !important; }
.sd-align-end { align-items: flex-end; }
#sd-header { display: flex; align-items: baseline; gap: 14px; padding: 6px 2px 2px; }
#sd-header h1 { font-size: 24px; font-weight: 700; margin: 0; letter-spacing: -0.02em; }
#sd-header h1 span { color: var(--color-accent); }
#sd-header p { margin: 0; color: var(--body-text-color-subdued); font-size: 14px; }
.sd-muted { color: var(--body-text-color-subdued); font-size: 13px; }
.sd-preset-note { margin-top: -6px; }
.sd-alpha { align-self: center; padding: 6px 10px; min-width: 150px; }
.sd-panel { padding: 4px 6px; }
.sd-notice { padding: 9px 13px; border-radius: 8px; font-size: 14px; line-height: 1.4; margin: 2px 0; }
.sd-error { background: #fef2f2; color: #991b1b; border: 1px solid #fecaca; }
.sd-ok { background: #f0fdf4; color: #166534; border: 1px solid #bbf7d0; }
.dark .sd-error { background: #450a0a; color: #fecaca; border-color: #7f1d1d; }
.dark .sd-ok { background: #052e16; color: #bbf7d0; border-color: #14532d; }
.sd-progress { padding: 12px 14px; border: 1px solid var(--border-color-primary); border-radius: 10px;
               background: var(--block-background-fill); }
.sd-progress-top { display: flex; align-items: center; gap: 12px; margin-bottom: 9px; font-size: 14px; }
.sd-details { flex: 1; color: var(--body-text-color); font-variant-numeric: tabular-nums; }
.sd-percent { font-weight: 700; font-variant-numeric: tabular-nums; }
.sd-bar { height: 10px; background: var(--neutral-200); border-radius: 999px; overflow: hidden; }
.dark .sd-bar { background: var(--neutral-700); }
.sd-fill { height: 100%; border-radius: 999px; background: linear-gradient(90deg, #818cf8, #4f46e5);
           transition: width 0.6s ease; }
.sd-finished .sd-fill { background: linear-gradient(90deg, #34d399, #059669); }
.sd-stopped .sd-fill, .sd-interrupted .sd-fill { background: linear-gradient(90deg, #fcd34d, #d97706); }
.sd-error .sd-fill { background: #dc2626; }
.sd-badge { font-size: 12px; font-weight: 600; padding: 2px 9px; border-radius: 999px; text-transform: uppercase;
            letter-spacing: 0.04em; background: #e0e7ff; color: #3730a3; }
.sd-badge-finished { background: #d1fae5; color: #065f46; }
.sd-badge-stopped, .sd-badge-interrupted { background: #fef3c7; color: #92400e; }
.sd-badge-error { background: #fee2e2; color: #991b1b; }
.sd-badge-starting, .sd-badge-created { background: #f1f5f9; color: #334155; }
.sd-log { display: flex; flex-direction: column-reverse; max-height: 230px; min-height: 80px; overflow: auto;
          padding: 8px 12px; border: 1px solid var(--border-color-primary); border-radius: 8px;
          background: var(--background-fill-secondary); }
.sd-log pre { margin: 0; font-family: var(--font-mono); font-size: 12px; line-height: 1.45; white-space: pre-wrap;
              word-break: break-word; }
.sd-confirm { padding: 8px 12px; border-radius: 8px; background: #fff7ed; border: 1px solid #fed7aa; align-items: center; }
.dark .sd-confirm { background: #431407; border-color: #7c2d12; }
.sd-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.sd-files { width: 100%; border-collapse: collapse; font-size: 14px; }
.sd-files, .sd-files tr { border: 0 !important; }
.sd-files td { padding: 6px 10px !important; border: 0 !important;
               border-bottom: 1px solid var(--border-color-primary) !important; }
.sd-files td.sd-size { color: var(--body-text-color-subdued); text-align: right; font-variant-numeric: tabular-nums; }
.sd-files a { color: var(--color-accent); text-decoration: none; font-weight: 500; }
.sd-check { padding: 10px 14px; border: 1px solid var(--border-color-primary); border-radius: 10px;
            font-size: 13px; line-height: 1.45; }
.sd-check ul { margin: 4px 0 8px 18px; padding: 0; }
.sd-check-verdict { font-weight: 600; font-size: 14px; margin-bottom: 6px; }
.sd-verdict-ok { color: #047857; }
.sd-verdict-bad { color: #b91c1c; }
.sd-check-error b { color: #b91c1c; }
.sd-check-warning b { color: #b45309; }
.sd-check-info b { color: var(--body-text-color-subdued); }
.sd-loadcheck { margin-top: 9px; padding: 5px 10px; border-radius: 8px; font-size: 13px; line-height: 1.4;
                overflow-wrap: anywhere; }
.sd-loadcheck b { font-weight: 600; margin-right: 4px; }
.sd-loadcheck-mark { font-weight: 700; margin-right: 6px; }
.sd-loadcheck-ok { background: #ecfdf5; color: #065f46; border: 1px solid #a7f3d0; }
.sd-loadcheck-bad { background: #fef2f2; color: #991b1b; border: 1px solid #fecaca; }
.dark .sd-loadcheck-ok { background: #052e16; color: #bbf7d0; border-color: #14532d; }
.dark .sd-loadcheck-bad { background: #450a0a; color: #fecaca; border-color: #7f1d1d; }
.sd-chip { font-size: 11px; font-weight: 600; padding: 1px 7px; border-radius: 999px; margin-left: 6px; }
.sd-chip-ok { background: #d1fae5; color: #065f46; }
.sd-chip-bad { background: #fee2e2; color: #991b1b; }
.sd-file-bad { color: #991b1b; text-decoration: line-through; }
.sd-memory { margin-top: 6px; font-size: 13px; color: var(--body-text-color-subdued); }
.sd-memory-warning { margin-top: 6px; padding: 5px 10px; border-radius: 8px; font-size: 13px;
                     background: #fffbeb; color: #92400e; border: 1px solid #fde68a; }
.sd-memory-changes { margin-top: 6px; }
.sd-grid { overflow-x: auto; }
.sd-grid table { border-collapse: separate !important; border-spacing: 4px; width: auto !important;
                 border: 0 !important; margin: 0 0 4px !important; }
.sd-grid tr, .sd-grid th, .sd-grid td { border: 0 !important; background: transparent !important;
                                        padding: 0 4px !important; vertical-align: middle; }
.sd-grid th { font-size: 12px; font-weight: 600; color: var(--body-text-color-subdued); white-space: nowrap;
              text-align: center; font-variant-numeric: tabular-nums; }
.sd-grid th.sd-grid-prompt { text-align: left; min-width: 110px; max-width: 210px; white-space: normal;
                             font-weight: 500; color: var(--body-text-color); line-height: 1.35; }
.sd-grid td { padding: 0 !important; }
.sd-grid img { display: block; width: 84px; height: 84px; object-fit: contain; border-radius: 6px;
               image-rendering: pixelated; border: 1px solid var(--border-color-primary); cursor: zoom-in;
               background: var(--background-fill-secondary); }
.sd-grid a { display: block; line-height: 0; }
.sd-grid img { margin: 0 !important; max-width: none !important; }
.sd-grid img:hover { outline: 2px solid var(--color-accent); }
.sd-grid td.sd-grid-missing { text-align: center; color: var(--body-text-color-subdued); }
.sd-grid-empty { padding: 14px; border: 1px dashed var(--border-color-primary); border-radius: 8px; }
footer { opacity: 0.7; }
"""

HEADER = """
<div id="sd-header">
  <h1>sd<span>lora</span></h1>
  <p>Train Stable Diffusion LoRA / LoCon adapters: pick a dataset, choose a preset, press Train.</p>
</div>
"""
