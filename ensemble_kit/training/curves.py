"""Training curves of ``ek cv``: loss and dice per epoch of every fold, as one PNG."""

from __future__ import annotations

from pathlib import Path

from ..plots import pyplot, save_figure


def plot_training_curves(metrics: dict, path: Path) -> Path:
    """Loss and dice per epoch of every fold, saved as one PNG (for ``ek cv``).

    Args:
        metrics: fold -> DataFrame with columns epoch, train_loss, val_loss, val_dice, lr,
            seconds.
        path: Output PNG.

    Returns:
        ``path``.
    """
    plt = pyplot()
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, frame in sorted(metrics.items()):
        epochs = frame["epoch"]
        line = loss_ax.plot(epochs, frame["train_loss"], marker="o", label=f"fold {fold} train")[0]
        color = line.get_color()
        loss_ax.plot(
            epochs, frame["val_loss"], "--", marker="s", color=color, label=f"fold {fold} val"
        )
        dice_ax.plot(epochs, frame["val_dice"], marker="o", color=color, label=f"fold {fold}")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    dice_ax.set(xlabel="epoch", ylabel="validation dice", title="Dice")
    for ax in (loss_ax, dice_ax):
        ax.legend(fontsize="x-small")
    return save_figure(fig, Path(path))
