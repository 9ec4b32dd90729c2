// chart.h — the loss curve of a training run as a self-contained SVG (train and val loss against step), drawn
// without external tools so that a run directory can be looked at in a browser as it trains.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "fileutil.h"

struct LossPoint {  // one step of a run
    int step;
    double loss;
    double val_loss;  // NaN when not evaluated at this step
};

inline std::string xml_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        if (c == '&') out += "&amp;";
        else if (c == '<') out += "&lt;";
        else if (c == '>') out += "&gt;";
        else if (c == '"') out += "&quot;";
        else out += c;
    }
    return out;
}

// "nice" axis ticks (1, 2, 5 times a power of ten) covering [lo, hi]
inline std::vector<double> nice_ticks(double& lo, double& hi, int target) {
    if (!(hi > lo)) {
        double pad = std::max(std::fabs(lo) * 0.05, 0.5);
        lo -= pad;
        hi += pad;
    }
    double raw = (hi - lo) / std::max(target, 1);
    double mag = std::pow(10.0, std::floor(std::log10(raw)));
    double step = mag;
    for (double m : {1.0, 2.0, 5.0, 10.0})
        if (raw <= m * mag * 1.0000001) {
            step = m * mag;
            break;
        }
    lo = std::floor(lo / step) * step;
    hi = std::ceil(hi / step) * step;
    std::vector<double> ticks;
    for (double t = lo; t <= hi + step * 1e-6; t += step) ticks.push_back(std::fabs(t) < step * 1e-9 ? 0 : t);
    return ticks;
}

inline std::string tick_label(double v, double step) {
    int decimals = std::max(0, (int)std::ceil(-std::log10(step) - 1e-9));
    return strfmt("%.*f", std::min(decimals, 6), v);
}

inline void write_loss_svg(const std::string& path, const std::vector<LossPoint>& rows, const std::string& title) {
    const double W = 800, H = 480, left = 72, right = 24, top = 48, bottom = 60;
    const double pw = W - left - right, ph = H - top - bottom;

    // train loss, averaged in buckets so that a long run stays a small file
    std::vector<std::pair<double, double>> train, val;
    size_t bucket = std::max<size_t>(1, (rows.size() + 1499) / 1500);
    for (size_t i = 0; i < rows.size(); i += bucket) {
        double s = 0, l = 0;
        size_t n = 0;
        for (size_t j = i; j < std::min(rows.size(), i + bucket); j++)
            if (std::isfinite(rows[j].loss)) {
                s += rows[j].step;
                l += rows[j].loss;
                n++;
            }
        if (n) train.push_back({s / n, l / n});
    }
    for (const LossPoint& r : rows)
        if (std::isfinite(r.val_loss)) val.push_back({(double)r.step, r.val_loss});

    double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
    for (const auto* series : {&train, &val})
        for (const auto& p : *series) {
            x0 = std::min(x0, p.first), x1 = std::max(x1, p.first);
            y0 = std::min(y0, p.second), y1 = std::max(y1, p.second);
        }
    if (!std::isfinite(x0)) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
    x0 = std::min(x0, 0.0);
    std::vector<double> xt = nice_ticks(x0, x1, 8), yt = nice_ticks(y0, y1, 6);
    double xstep = xt.size() > 1 ? xt[1] - xt[0] : 1, ystep = yt.size() > 1 ? yt[1] - yt[0] : 1;
    auto X = [&](double x) { return left + (x - x0) / (x1 - x0) * pw; };
    auto Y = [&](double y) { return top + (1 - (y - y0) / (y1 - y0)) * ph; };

    std::string s;
    s += strfmt("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
                "font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n", W, H, W, H);
    s += strfmt("<rect width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n", W, H);
    s += strfmt("<text x=\"%.1f\" y=\"28\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">%s</text>\n",
                left + pw / 2, xml_escape(title).c_str());
    // grid, ticks and labels
    s += "<g stroke=\"#e5e5e5\" stroke-width=\"1\">\n";
    for (double t : xt) s += strfmt("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", X(t), top, X(t), top + ph);
    for (double t : yt) s += strfmt("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", left, Y(t), left + pw, Y(t));
    s += "</g>\n<g fill=\"#333\">\n";
    for (double t : xt) {
        s += strfmt("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", X(t), top + ph, X(t), top + ph + 5);
        s += strfmt("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", X(t), top + ph + 19,
                    tick_label(t, xstep).c_str());
    }
    for (double t : yt) {
        s += strfmt("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", left - 5, Y(t), left, Y(t));
        s += strfmt("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n", left - 8, Y(t) + 4,
                    tick_label(t, ystep).c_str());
    }
    s += "</g>\n";
    s += strfmt("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#333\"/>\n", left, top, pw, ph);
    s += strfmt("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"13\">step</text>\n", left + pw / 2, H - 16);
    s += strfmt("<text x=\"18\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"13\" transform=\"rotate(-90 18 %.1f)\">"
                "loss (cross-entropy, nats)</text>\n", top + ph / 2, top + ph / 2);
    // the curves
    auto polyline = [&](const std::vector<std::pair<double, double>>& pts, const char* color, double width) {
        if (pts.empty()) return;
        s += strfmt("<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"%.1f\" stroke-linejoin=\"round\" points=\"", color, width);
        for (const auto& p : pts) s += strfmt("%.1f,%.1f ", X(p.first), Y(p.second));
        s += "\"/>\n";
    };
    polyline(train, "#1f77b4", 1.2);
    polyline(val, "#ff7f0e", 2.0);
    for (const auto& p : val)
        s += strfmt("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"#ff7f0e\" stroke=\"white\" stroke-width=\"1\"/>\n",
                    X(p.first), Y(p.second));
    // legend, top right
    double lx = left + pw - 150, ly = top + 12;
    s += strfmt("<rect x=\"%.1f\" y=\"%.1f\" width=\"140\" height=\"%d\" fill=\"white\" fill-opacity=\"0.9\" stroke=\"#ccc\"/>\n",
                lx, ly, val.empty() ? 26 : 46);
    s += strfmt("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\n", lx + 10,
                ly + 14, lx + 34, ly + 14);
    s += strfmt("<text x=\"%.1f\" y=\"%.1f\">train loss</text>\n", lx + 42, ly + 18);
    if (!val.empty()) {
        s += strfmt("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ff7f0e\" stroke-width=\"2\"/>\n", lx + 10,
                    ly + 34, lx + 34, ly + 34);
        s += strfmt("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"#ff7f0e\"/>\n", lx + 22, ly + 34);
        s += strfmt("<text x=\"%.1f\" y=\"%.1f\">val loss</text>\n", lx + 42, ly + 38);
    }
    s += "</svg>\n";
    write_file_atomic(path, s);
}
