"""The reference DDPM code (GaussianDiffusion, SimpleUNet, train_diffusion_model) as published
with the DDPM derivation this library follows, kept verbatim except for the missing
``import math``. Tests check that ddpm_fast's class is a drop-in for it.
"""
import math  # missing in the original listing (SimpleUNet.timestep_embedding uses it)
import torch
import torch.nn as nn
import torch.nn.functional as F
from typing import Optional, Tuple

class GaussianDiffusion:
    """
    DDPM的高斯扩散过程实现
    
    核心功能:
    1. 定义噪声调度(beta schedule)
    2. 计算前向过程和反向过程的分布参数
    3. 计算简化的训练损失
    4. 实现采样过程
    """
    
    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        device: str = 'cuda'
    ):
        self.num_timesteps = num_timesteps
        self.device = device
        
        # 定义beta schedule(线性调度)
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, device=device)
        
        # 计算alpha和alpha_bar
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)
        
        # 计算采样过程中的关键参数
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        
        # 后验方差(用于反向过程)
        self.posterior_variance = (
            self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        
        # 计算后验均值系数
        self.posterior_mean_coef1 = self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
    
    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        前向过程:从x_0采样x_t
        
        公式:x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * epsilon
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        
        sqrt_alphas_cumprod_t = self._extract(self.sqrt_alphas_cumprod, t, x_start.shape)
        sqrt_one_minus_alphas_cumprod_t = self._extract(
            self.sqrt_one_minus_alphas_cumprod, t, x_start.shape
        )
        
        return sqrt_alphas_cumprod_t * x_start + sqrt_one_minus_alphas_cumprod_t * noise
    
    def p_losses(
        self,
        denoise_model: nn.Module,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        loss_type: str = "mse"
    ) -> torch.Tensor:
        """
        计算简化训练损失
        
        公式:L_simple = E[||epsilon - epsilon_theta(x_t, t)||^2]
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        
        # 前向过程:采样x_t
        x_t = self.q_sample(x_start, t, noise)
        
        # 神经网络预测噪声
        predicted_noise = denoise_model(x_t, t)
        
        # 计算损失
        if loss_type == "mse":
            loss = F.mse_loss(predicted_noise, noise)
        elif loss_type == "l1":
            loss = F.l1_loss(predicted_noise, noise)
        else:
            raise NotImplementedError(f"Unknown loss type: {loss_type}")
        
        return loss
    
    def p_mean_variance(
        self,
        denoise_model: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        计算反向过程p(x_{t-1}|x_t)的均值和方差
        """
        # 预测噪声
        predicted_noise = denoise_model(x_t, t)
        
        # 计算均值
        alpha_t = self._extract(self.alphas, t, x_t.shape)
        alpha_bar_t = self._extract(self.alphas_cumprod, t, x_t.shape)
        beta_t = self._extract(self.betas, t, x_t.shape)
        sqrt_one_minus_alpha_bar_t = self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        
        # 公式:mu_theta = (x_t - beta_t/sqrt(1-alpha_bar_t) * epsilon_theta) / sqrt(alpha_t)
        mean = (x_t - beta_t / sqrt_one_minus_alpha_bar_t * predicted_noise) / torch.sqrt(alpha_t)
        
        # 计算方差(使用后验方差)
        variance = self._extract(self.posterior_variance, t, x_t.shape)
        
        return mean, variance
    
    def p_sample(
        self,
        denoise_model: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor
    ) -> torch.Tensor:
        """
        单步反向采样:从x_t采样x_{t-1}
        """
        mean, variance = self.p_mean_variance(denoise_model, x_t, t)
        noise = torch.randn_like(x_t)
        
        # 当t=0时,不添加噪声
        nonzero_mask = ((t != 0).float().view(-1, *([1] * (len(x_t.shape) - 1))))
        
        return mean + nonzero_mask * torch.sqrt(variance) * noise
    
    def p_sample_loop(
        self,
        denoise_model: nn.Module,
        shape: Tuple[int, ...]
    ) -> torch.Tensor:
        """
        完整采样循环:从x_T采样到x_0
        """
        # 从纯噪声开始
        x_t = torch.randn(shape, device=self.device)
        
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((shape[0],), i, device=self.device, dtype=torch.long)
            x_t = self.p_sample(denoise_model, x_t, t)
        
        return x_t
    
    @staticmethod
    def _extract(
        a: torch.Tensor,
        t: torch.Tensor,
        x_shape: Tuple[int, ...]
    ) -> torch.Tensor:
        """
        从调度中提取特定时间步的参数,并广播到输入形状
        """
        batch_size = t.shape[0]
        out = a.gather(-1, t)
        return out.reshape(batch_size, *((1,) * (len(x_shape) - 1)))


# 简化的UNet骨干网络(用于演示)
class SimpleUNet(nn.Module):
    """
    简化的UNet实现,用于噪声预测
    实际工程中应使用更复杂的架构(如ResNet块、注意力机制等)
    """
    
    def __init__(
        self,
        in_channels: int = 3,
        model_channels: int = 128,
        num_res_blocks: int = 2,
        attention_resolutions: Tuple[int, ...] = (16,),
        dropout: float = 0.0
    ):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        
        # 时间嵌入层
        self.time_embed = nn.Sequential(
            nn.Linear(128, model_channels),
            nn.SiLU(),
            nn.Linear(model_channels, model_channels)
        )
        
        # 输入卷积层
        self.input_blocks = nn.ModuleList([
            nn.Conv2d(in_channels, model_channels, kernel_size=3, padding=1)
        ])
        
        # 残差块和注意力层(简化实现)
        self.middle_block = self._make_res_block(model_channels, dropout)
        
        # 输出层
        self.output_blocks = nn.ModuleList([
            nn.Conv2d(model_channels, in_channels, kernel_size=3, padding=1)
        ])
    
    def _make_res_block(
        self,
        channels: int,
        dropout: float
    ) -> nn.Module:
        return nn.Sequential(
            nn.GroupNorm(32, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(32, channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        )
    
    def timestep_embedding(self, timesteps: torch.Tensor, dim: int = 128) -> torch.Tensor:
        """
        正弦位置编码,用于编码时间步信息
        """
        half = dim // 2
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, dtype=torch.float32) / half
        ).to(device=timesteps.device)
        args = timesteps[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding
    
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        前向传播:输入x_t和时间步t,输出预测的噪声
        """
        # 时间嵌入
        emb = self.timestep_embedding(timesteps)
        emb = self.time_embed(emb)
        
        # 输入处理
        h = self.input_blocks[0](x)
        
        # 中间处理(简化)
        h = self.middle_block(h)
        
        # 输出
        return self.output_blocks[0](h)


# 训练循环示例
def train_diffusion_model(
    denoise_model: nn.Module,
    diffusion: GaussianDiffusion,
    dataloader: torch.utils.data.DataLoader,
    num_epochs: int = 100,
    lr: float = 1e-4,
    device: str = 'cuda'
):
    """
    DDPM模型的训练循环
    """
    denoise_model = denoise_model.to(device)
    optimizer = torch.optim.AdamW(denoise_model.parameters(), lr=lr)
    
    for epoch in range(num_epochs):
        for batch_idx, (images, _) in enumerate(dataloader):
            images = images.to(device)  # 假设images在[-1, 1]范围
            
            batch_size = images.shape[0]
            
            # 随机采样时间步
            t = torch.randint(0, diffusion.num_timesteps, (batch_size,), device=device)
            
            # 计算损失
            loss = diffusion.p_losses(denoise_model, images, t)
            
            # 反向传播和优化
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            
            if batch_idx % 100 == 0:
                print(f"Epoch {epoch}, Batch {batch_idx}, Loss: {loss.item():.4f}")
        
        # 定期采样可视化
        if (epoch + 1) % 10 == 0:
            with torch.no_grad():
                samples = diffusion.p_sample_loop(denoise_model, (16, 3, 32, 32))
                # 保存或显示样本(略)
                print(f"Epoch {epoch + 1}: Generated samples")
    
    return denoise_model
